"""The similarity oracle: a face-recognition scoring service that answers a black-box
attacker with similarity scores only.

    settings.py   OracleSettings (YAML, one-line errors naming the key)
    store.py      SQLite (WAL): identities, API keys (sha256 only), usage, audit log
    images.py     request images -> (N, S, S, 3) uint8 crops; the seam for face alignment
    backend.py    the face embedder (fl_sim's registry) and template scoring
    schemas.py    the request and response bodies of the HTTP API
    ratelimit.py  per-key token buckets
    app.py        the FastAPI application (`create_app`)
    enroll.py     enrollment shared by the API and `fl-sim oracle enroll`

Run it with `fl-sim oracle serve --config oracle.yaml`; create keys with
`fl-sim oracle keys create --role admin|query --db oracle.sqlite`. Templates never leave
the service: no endpoint returns one.

This package stays cheap to import (no torch) until the app or the backend is built.
"""
