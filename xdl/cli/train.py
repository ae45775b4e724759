"""``xdl train``: parse flags, call :func:`xdl.api.train`, say where the run went."""

from __future__ import annotations

import click

from xdl.cli.options import csv_ints, csv_strs, seed_type, trust_code_option


@click.command("train")
@click.option("--data", default="digits", show_default=True,
              help="digits | mnist | fashion-mnist | cifar10 | FILE.csv | FILE.npz | image folder")
@click.option("--data-dir", type=click.Path(file_okay=False), help="where mnist/fashion-mnist/cifar10 files are (else $XDL_DATA_DIR, else download)")
@click.option("--target", help="CSV: the label column")
@click.option("--sensitive", help="CSV: group columns kept for the bias report, comma-separated")
@click.option("--limit", type=click.IntRange(min=1), help="use at most this many training rows")
@click.option("--input-size", type=click.IntRange(1, 4096), help="image folders: resize (shorter side) and centre-crop every image to N×N")
@click.option("--color", type=click.Choice(["gray", "rgb"]), help="image folders: convert every image to grayscale or RGB (default: RGB if any image is colour)")
@click.option("--model", default="auto", show_default=True, help="mlp | cnn | dpcnn | package.module:factory (auto: cnn for images, dpcnn with --dp-epsilon, mlp for tables)")
@click.option("--hidden", callback=csv_ints, help="hidden layer sizes, e.g. 256,128")
@click.option("--channels", callback=csv_ints, help="cnn conv widths, e.g. 32,64")
@click.option("--activation", help="relu | gelu | tanh | silu | elu")
@click.option("--dropout", type=float, help="dropout probability in [0, 1)")
@click.option("--batch-norm/--no-batch-norm", default=None)
@click.option("--epochs", type=int, default=None, help="default: until the validation loss stops improving (then the rate decays to zero); 10 with --dp-epsilon")
@click.option("--batch-size", type=int, help="default 128; 256 with --dp-epsilon")
@click.option("--lr", type=float, help="peak learning rate; default 0.003, 0.01 with --dp-epsilon")
@click.option("--optimizer", type=click.Choice(["adam", "adamw", "sgd"]), default="adamw", show_default=True)
@click.option("--schedule", type=click.Choice(["onecycle", "cosine", "none"]), default="onecycle", show_default=True)
@click.option("--weight-decay", type=float, default=5e-4, show_default=True)
@click.option("--l1", type=float, default=0.0, show_default=True, help="L1 penalty on weights")
@click.option("--label-smoothing", type=float, default=0.0, show_default=True)
@click.option("--grad-clip", type=float, default=0.0, show_default=True, help="max gradient norm (0: off)")
@click.option("--early-stopping", type=int, default=0, show_default=True, help="patience in epochs (0: off)")
@click.option("--augment", callback=csv_strs, help="comma list of shift, rotate, flip, noise, cutout, or none (default: shift for images, none for tables)")
@click.option("--mixup", type=float, default=0.0, show_default=True, help="mixup Beta(α, α); 0: off")
@click.option("--noise-sigma", type=float, default=0.0, show_default=True,
              help="add unclamped Gaussian noise of this std (input units) to every training input, "
                   "for randomized smoothing (xdl report --method certify); 0: off")
@click.option("--adv-train", default="none", show_default=True, metavar="none|fgsm|pgd",
              help="train on adversarial batches: fgsm (random start, Wong et al. 2020) or pgd (Madry et al. 2018)")
@click.option("--adv-eps", type=float, default=0.1, show_default=True, help="attack radius (L∞) for --adv-train, in input units")
@click.option("--adv-steps", type=int, default=10, show_default=True, help="PGD steps for --adv-train pgd")
@click.option("--adv-step", type=float, default=1.25, show_default=True,
              help="FGSM step for --adv-train fgsm, as a multiple of --adv-eps (a PGD-10 guard stops catastrophic overfitting)")
@click.option("--dp-epsilon", type=float, help="train with differential privacy (Opacus DP-SGD) spending at most this ε")
@click.option("--dp-delta", type=float, default=1e-5, show_default=True, help="δ of the (ε, δ) guarantee; below 1/N")
@click.option("--dp-max-grad-norm", type=float, default=1.0, show_default=True, help="per-record gradient clip for --dp-epsilon")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | mps")
@click.option("--amp/--no-amp", default=True, show_default=True, help="mixed precision: bf16 (or fp16) autocast on CUDA, bf16 on CPUs that run it natively (AVX512-BF16, AMX)")
@click.option("--compile", is_flag=True, help="torch.compile the model for training (GPU; the first epoch is slower)")
@click.option("--seed", type=seed_type, default=0, show_default=True)
@click.option("--out", type=click.Path(), help="run directory (default: a new runs/run-NNN)")
@click.option("--force", is_flag=True, help="replace an existing run at --out")
@click.option("--resume", type=click.Path(file_okay=False), help="continue the unfinished run RUN from its last epoch checkpoint (its saved config is used)")
@click.option("--init-weights", type=click.Path(dir_okay=False), help="start from these weights (.safetensors, .pt or .pth; never executes code)")
@click.option("--quiet", "-q", is_flag=True, help="no progress bars or per-epoch lines")
@trust_code_option
def command(data, data_dir, target, sensitive, limit, input_size, color, model, hidden, channels, activation, dropout,
            batch_norm, out, force, resume, init_weights, quiet, trust_code, **train_options) -> None:
    """Train a model and save it as a run directory (weights, run.json, history.csv)."""
    from xdl.api import train

    data_options = {"data_dir": data_dir, "target": target, "sensitive": sensitive, "limit": limit,
                    "input_size": input_size, "channels": {"gray": 1, "rgb": 3}.get(color)}
    model_options = {"hidden": hidden, "channels": channels, "activation": activation,
                     "dropout": dropout, "batch_norm": batch_norm}
    if train_options["augment"] == ["none"]:
        train_options["augment"] = []
    if resume and out and out != resume:
        raise click.BadParameter("--resume RUN continues RUN in place; leave out --out", param_hint="--resume")
    run = train(data, model, resume or out, force=force, quiet=quiet, data_options=data_options,
                model_options=model_options, resume=bool(resume), init_weights=init_weights, trust_code=trust_code,
                **train_options)
    if run is None:  # a torchrun rank other than 0: rank 0 wrote the run and says where
        return
    click.echo(f"run saved to {run.path}  (test accuracy {run.metrics['test_accuracy']:.4f})")
