"""breaching's InvertG on fl-sim's attack cases; runs inside breaching's own environment.

    <breaching env>/bin/python benchmarks/breaching_runner.py JOB_JSON

JOB_JSON names a file holding fl-sim attack cases and their true images (written by
`fl-sim bench attack --against breaching`), the iterations, the iteration from which the
clock runs, and the thread count. Each victim is attacked alone (breaching has no
multi-victim path) with breaching's `invertinggradients` configuration, the model being
exactly the case's (built by fl-sim, weights loaded by breaching from the server payload).
Prints one JSON line: iterations per second per victim, the PSNR of each returned image, and
the peak resident memory.
"""
from __future__ import annotations

import json
import resource
import sys
import time


def main(argv: list[str]) -> int:
    job = json.loads(argv[0])
    import torch
    from omegaconf import OmegaConf

    import breaching
    from attacks.case import AttackCase
    from fl_sim.metrics import psnr

    torch.set_num_threads(job["threads"])
    blob = torch.load(job["cases"], map_location="cpu", weights_only=True)
    iterations, warmup = job["iterations"], job["warmup"]
    cfg = breaching.get_attack_config("invertinggradients", overrides=[
        f"optim.max_iterations={iterations}", f"optim.callback={iterations + 1}"])
    setup = dict(device=torch.device("cpu"), dtype=torch.float)
    rates, psnrs = [], []
    for d, truth in zip(blob["cases"], blob["truth"]):
        case = AttackCase.from_dict(d)
        model = case.build_model()
        names = case.parameter_names(model)
        if names != [n for n, _ in model.named_parameters()]:
            raise ValueError("breaching matches the gradient of every parameter; this case updates a subset")
        meta = OmegaConf.create(dict(shape=list(case.image_shape), mean=list(case.mean), std=list(case.std),
                                     modality="vision", classes=case.num_classes))
        # BatchNorm as the client ran it: eval mode uses the sent running statistics (breaching
        # switches the model to eval when the server payload has buffers).
        buffers = [b.clone() for b in model.buffers()] if case.bn_mode == "eval" else None
        payload = [dict(parameters=[p.detach().clone() for p in model.parameters()], buffers=buffers,
                        metadata=meta)]
        shared = [dict(gradients=[case.update[n].clone() for n in names], buffers=None,
                       metadata=dict(num_data_points=case.num_images, labels=case.labels.clone(),
                                     local_hyperparams=None))]
        attacker = breaching.attacks.prepare_attack(model, torch.nn.CrossEntropyLoss(), cfg, setup)
        stamps: list[float] = []
        compute = attacker._compute_objective

        def timed(*args, **kwargs):  # called once per iteration, before its step
            stamps.append(time.perf_counter())
            return compute(*args, **kwargs)

        attacker._compute_objective = timed
        torch.manual_seed(job.get("seed", 0))
        out, _ = attacker.reconstruct(payload, shared, {}, dryrun=False)
        end = time.perf_counter()
        rates.append((iterations - warmup) / (end - stamps[warmup]))
        dm = torch.tensor(case.mean).view(1, -1, 1, 1)
        ds = torch.tensor(case.std).view(1, -1, 1, 1)
        image = (out["data"].detach() * ds + dm).clamp(0, 1)
        psnrs.append(float(psnr(image, truth)))
    rates.sort()
    print(json.dumps({"victim_it_per_s": rates[len(rates) // 2], "per_victim_it_per_s": rates, "psnr": psnrs,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "torch": torch.__version__, "breaching": _version()}))
    return 0


def _version() -> str:
    from importlib.metadata import version

    try:
        return version("breaching")
    except Exception:  # a checkout run from its folder has no distribution metadata
        return "checkout"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
