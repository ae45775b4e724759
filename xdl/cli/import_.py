"""``xdl import MODEL``: parse flags, call :func:`xdl.training.importing.import_model`, say where the run went."""

from __future__ import annotations

import click

from xdl.cli.options import csv_ints, csv_strs


@click.command("import")
@click.argument("model")
@click.option("--data", default="digits", show_default=True,
              help="the data to audit it on: digits | mnist | FILE.csv | FILE.npz | image folder")
@click.option("--data-dir", type=click.Path(file_okay=False), help="where mnist/fashion-mnist/cifar10 files are")
@click.option("--target", help="CSV: the label column")
@click.option("--sensitive", help="CSV: group columns kept for the bias report, comma-separated")
@click.option("--limit", type=click.IntRange(min=1), help="use at most this many rows of the data")
@click.option("--weights", type=click.Path(dir_okay=False), help="package.module:factory: its weights (.safetensors, .pt or .pth; never executes code)")
@click.option("--input-size", callback=csv_ints, help="H,W (or one size) the model takes; default: from the model's config")
@click.option("--normalize", help="imagenet | none | MEAN,STD (per channel m1/m2/m3,s1/s2/s3), applied inside the model; default: the model's config, else none")
@click.option("--classes", callback=csv_strs, help="class names, one per model output, comma-separated (default: the model's config, else the data)")
@click.option("--num-classes", type=click.IntRange(min=2), help="package.module:factory: how many outputs to build it with")
@click.option("--trust-code", is_flag=True, help="allow a package.module:factory MODEL to import and run its code")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | mps")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(), help="run directory (default: a new runs/run-NNN)")
@click.option("--force", is_flag=True, help="replace an existing run at --out")
@click.option("--quiet", "-q", is_flag=True, help="no progress lines")
def command(model, data, data_dir, target, sensitive, limit, weights, input_size, normalize, classes, num_classes,
            trust_code, device, seed, out, force, quiet) -> None:
    """Make a run directory for a model xdl did not train, so explain/attack/report/audit work on it.

    \b
    MODEL is one of
      hf:DIR                   a Hugging Face image classifier saved with save_pretrained (safetensors)
      FILE.keras               a Keras 3 model, run on Keras' torch backend, loaded in safe mode
      FILE.pt2                 a torch.export program
      package.module:factory   factory(in_shape, num_classes) plus --weights FILE (needs --trust-code)
    """
    from xdl.errors import XdlError
    from xdl.training.importing import import_model

    if input_size is not None and len(input_size) == 1:
        input_size = input_size * 2
    if input_size is not None and len(input_size) != 2:
        raise XdlError(f"--input-size takes H,W or one size, got {len(input_size)} numbers")
    data_options = {"data_dir": data_dir, "target": target, "sensitive": sensitive, "limit": limit}
    run = import_model(model, data, out, weights=weights, input_size=input_size, normalize=normalize, classes=classes,
                       num_classes=num_classes, trust_code=trust_code, force=force, seed=seed, device=device,
                       data_options={k: v for k, v in data_options.items() if v is not None}, quiet=quiet)
    click.echo(f"run saved to {run.path}  (imported {run.info['imported']['format']}; "
               f"test accuracy {run.metrics['test_accuracy']:.4f})")
