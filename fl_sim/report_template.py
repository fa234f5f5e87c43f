"""The report page's Jinja2 template.

It lives in a Python module rather than a .j2 file because a Flower app bundle (what
`flwr run .` ships to the ServerApp) carries only .py, .toml, .md, .yaml and .json files:
a template file would be missing there and the report could not be written.
"""

REPORT_TEMPLATE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>fl-sim report: {{ config.name }}</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }
 h1 { margin-bottom: .2rem; } .sub { color: #666; margin-top: 0; }
 table { border-collapse: collapse; margin: .5rem 0 1.5rem; font-size: .9rem; }
 th, td { border-bottom: 1px solid #ddd; padding: .3rem .6rem; text-align: right; }
 th:first-child, td:first-child { text-align: left; }
 table.paired td:nth-child(2), table.paired td:last-child, table.paired th:nth-child(2), table.paired th:last-child { text-align: left; }
 .figs { display: flex; gap: 1.5rem; flex-wrap: wrap; }
 .victim { display: flex; gap: .8rem; align-items: flex-start; margin: .8rem 0; padding-bottom: .8rem; border-bottom: 1px solid #eee; }
 .victim figure { margin: 0; text-align: center; font-size: .75rem; }
 .victim img { image-rendering: pixelated; width: 128px; height: auto; border: 1px solid #ccc; }
 .victim .who { width: 90px; font-size: .85rem; color: #444; }
 details pre { background: #f6f6f6; padding: .8rem; font-size: .8rem; overflow-x: auto; }
</style>
</head>
<body>
<h1>{{ config.name }}</h1>
<p class="sub">{{ config.model.name }} on {{ config.data.name }} at {{ config.data.image_size }} px,
 {{ config.federation.algorithm }} with {{ config.federation.num_clients }} clients
 ({{ config.federation.clients_per_round }} per round, batch {{ config.federation.batch_size }}),
 seed {{ config.seed }}, {% if config.model.weights %}starting from the trained weights {{ config.model.weights }}{% else %}starting untrained{% endif %}{% if config.defenses %}, defenses: {{ config.defenses | map(attribute='name') | join(', ') }}{% endif %}.</p>
{% if privacy %}<p class="sub">Privacy: {{ privacy }}.</p>{% endif %}

<h2>Leakage per attack</h2>
{% if table_rows %}
<table>
 <tr>{% for c in table_columns %}<th>{{ c }}{% if c in higher_is_better %} {{ '↑' if higher_is_better[c] else '↓' }}{% endif %}</th>{% endfor %}</tr>
 {% for row in table_rows %}<tr>{% for v in row %}<td>{{ v }}</td>{% endfor %}</tr>{% endfor %}
</table>
<p class="sub">Means over victims. SSIM is the standard Gaussian-window SSIM; LPIPS is v0.1 on AlexNet;
 id_similarity is the cosine similarity of face embeddings (critic model named in the config);
 id_rank1 the share of reconstructions whose most similar identity among all of the data set's
 (each known from its other photos) is the victim's; id_rank the victim's place in that ordering
 (1: named first; a reconstruction that carries no identity lands near the middle).</p>
{% else %}<p>No attack results yet.</p>{% endif %}

{% if paired %}
<h2>{{ paired.title }}</h2>
{% if paired.rows %}
<table class="paired">
 <tr>{% for c in paired.columns %}<th>{{ c }}</th>{% endfor %}</tr>
 {% for row in paired.rows %}<tr>{% for v in row %}<td>{{ v }}</td>{% endfor %}</tr>{% endfor %}
</table>
{% endif %}
<p class="sub">{{ paired.caption }}</p>
{% endif %}

<div class="figs">
{% if accuracy %}<figure><img src="{{ accuracy }}" alt="test accuracy per round"><figcaption>Test accuracy per round</figcaption></figure>{% endif %}
{% if leakage %}<figure><img src="{{ leakage }}" alt="leakage per round"><figcaption>Leakage (mean PSNR) per round</figcaption></figure>{% endif %}
{% if history_figure %}<figure><img src="{{ history_figure }}" alt="how the attacked model was trained"><figcaption>The federation that trained the attacked model ({{ history.run }}): test accuracy per round; the attacked model is round {{ history.round }}'s ({{ '%.1f' % (history.accuracy * 100) }} %)</figcaption></figure>{% endif %}
</div>

{% for title, html in extra_sections %}
<h2>{{ title }}</h2>
{{ html | safe }}
{% endfor %}

<h2>Victims</h2>
{% for v in victims %}
<div class="victim">
 <div class="who">round {{ v.round }}<br>{{ v.who }}</div>
 <figure>{% if v.truth %}<img src="{{ v.truth }}" alt="ground truth">{% endif %}<figcaption>ground truth</figcaption></figure>
 {% for a in v.attacks %}
 <figure>{% if a.image %}<img src="{{ a.image }}" alt="{{ a.name }}">{% endif %}
  <figcaption><b>{{ a.name }}</b><br>{% for k, val in a.metrics.items() %}{{ k }} {{ val }}<br>{% endfor %}</figcaption></figure>
 {% endfor %}
</div>
{% endfor %}

{% if rounds_rows %}
<h2>Rounds</h2>
<table>
 <tr>{% for c in rounds_columns %}<th>{{ c }}</th>{% endfor %}</tr>
 {% for row in rounds_rows %}<tr>{% for v in row %}<td>{{ v }}</td>{% endfor %}</tr>{% endfor %}
</table>
{% endif %}

<details><summary>Resolved config</summary><pre>{{ config_yaml }}</pre></details>
</body>
</html>
"""
