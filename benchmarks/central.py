"""The federation's model trained centrally (`fl-sim bench central`): the accuracy a
federation is measured against.

The same architecture, initial weights (seed), train/test split, optimiser (plain SGD at the
clients' `local_lr` and `batch_size`, BatchNorm in the clients' `bn_mode`) and number of
passes over the training images as the federation, on the union of the clients' images in
one place. Epochs default to what the federation's clients train in all:
rounds x clients_per_round / num_clients x local_epochs (FedAvg) or, for FedSGD,
rounds x clients_per_round x batch_size / training images.

    fl-sim bench central                                    # configs/bench/federation.yaml
    fl-sim bench central configs/bench/federation.yaml --run runs/federation

With `--run` the federation's own test accuracy (its rounds.csv) is printed beside the
central one, with the gap in points.
"""
from __future__ import annotations

import argparse
import csv
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

DEFAULT_CONFIG = "configs/bench/federation.yaml"


@dataclass(frozen=True)
class EpochRecord:
    epoch: int
    test_accuracy: float
    test_loss: float
    train_loss: float
    seconds: float


def federation_epochs(config, train_images: int) -> float:
    """Passes over the training set the federation's clients make in all its rounds."""
    fed = config.federation
    share = fed.clients_per_round / fed.num_clients
    if fed.algorithm == "fedavg":
        if fed.local_steps is not None:
            return fed.rounds * fed.clients_per_round * fed.local_steps * fed.batch_size / train_images
        return fed.rounds * share * fed.local_epochs
    return fed.rounds * fed.clients_per_round * fed.batch_size / train_images


def train_central(config, epochs: int, on_epoch=None) -> list[EpochRecord]:
    """Train the config's model on all of the federation's training images; evaluate after
    every epoch on its test images."""
    from fl_sim.federated_data import build_federated_data
    from fl_sim.models import build_model
    from fl_sim.training import evaluate, train_mode
    from server.cases import initial_global_state

    fed = config.federation
    data = build_federated_data(config)
    ds = data.dataset
    x_train, y_train = ds.normalise(ds.images[data.train]), ds.labels[data.train]
    test = data.test_set()
    x_test, y_test = test.normalise(test.images), test.labels
    model = build_model(config.model.name, data.num_classes)
    model.load_state_dict(initial_global_state(config, data))  # the federation's starting point
    opt = torch.optim.SGD(model.parameters(), lr=fed.local_lr)
    gen = torch.Generator().manual_seed(config.seed)
    records: list[EpochRecord] = []
    t0 = time.perf_counter()
    for epoch in range(1, epochs + 1):
        train_mode(model, fed.bn_mode)
        order = torch.randperm(len(y_train), generator=gen)
        total, batches = 0.0, 0
        for i in range(0, len(order), fed.batch_size):
            idx = order[i:i + fed.batch_size]
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            loss.backward()
            opt.step()
            total, batches = total + float(loss.detach()), batches + 1
        acc, test_loss = evaluate(model, x_test, y_test)
        rec = EpochRecord(epoch, acc, test_loss, total / max(batches, 1), time.perf_counter() - t0)
        records.append(rec)
        if on_epoch:
            on_epoch(rec)
    return records


def federation_accuracy(run_dir: str | Path) -> tuple[int, float, float]:
    """(last round, its test accuracy, best test accuracy) of a run, from its rounds.csv."""
    rows = list(csv.DictReader((Path(run_dir) / "rounds.csv").open()))
    accs = [(int(r["round"]), float(r["test_accuracy"])) for r in rows if r["test_accuracy"] not in ("", "nan")]
    if not accs:
        raise ValueError(f"{run_dir}/rounds.csv holds no evaluated round")
    last_round, last = accs[-1]
    return last_round, last, max(a for _, a in accs)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fl-sim bench central", description=__doc__.split("\n\n")[0])
    p.add_argument("config", nargs="?", default=DEFAULT_CONFIG, help=f"experiment config (default {DEFAULT_CONFIG})")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, as for fl-sim run")
    p.add_argument("--epochs", type=int, help="epochs (default: the federation's passes over its data)")
    p.add_argument("--run", help="a finished run of the same config: print its accuracy beside")
    p.add_argument("--out", help="write the per-epoch figures to this CSV")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: all)")
    return p


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    from fl_sim.config import load_config
    from fl_sim.federated_data import build_federated_data

    args = build_parser().parse_args(argv)
    if "=" in args.config and not Path(args.config).exists():  # `fl-sim bench central key=value`
        args.overrides.insert(0, args.config)
        args.config = DEFAULT_CONFIG
    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_config(args.config, args.overrides)
    console = Console()
    train_images = len(build_federated_data(config).train)
    passes = federation_epochs(config, train_images)
    epochs = args.epochs or max(1, math.ceil(passes))
    fed = config.federation
    console.print(f"central training: {config.model.name}, {config.data.name} {config.data.image_size} px, "
                  f"{train_images} training images, SGD lr {fed.local_lr} batch {fed.batch_size}, BatchNorm "
                  f"{fed.bn_mode}, {epochs} epochs (the federation makes {passes:.1f} passes)")
    records = train_central(config, epochs, on_epoch=lambda r: console.print(
        f"epoch {r.epoch:3d}: test accuracy {r.test_accuracy:6.1%}  loss {r.test_loss:.3f}  "
        f"train loss {r.train_loss:.3f}  {r.seconds:.0f} s"))
    if args.out:
        with open(args.out, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(asdict(records[0])))
            w.writeheader()
            w.writerows(asdict(r) for r in records)
    final, best = records[-1].test_accuracy, max(r.test_accuracy for r in records)
    console.print(f"central: final {final:.1%}, best {best:.1%} over {epochs} epochs")
    if args.run:
        rnd, fed_final, fed_best = federation_accuracy(args.run)
        console.print(f"federation ({args.run}): round {rnd} {fed_final:.1%}, best {fed_best:.1%}; "
                      f"gap to central (final) {100 * (final - fed_final):+.1f} points")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
