"""The ``xdl`` entry point: a click group whose commands load only when invoked.

Command modules import torch inside their handlers, so ``xdl --help`` stays fast.
User errors (XdlError, bad flags) become one line on stderr and exit code 2.
"""

from __future__ import annotations

import importlib
import sys

import click

# name → (module:attribute, one-line help). The help lives here so listing commands imports nothing.
COMMANDS = {
    "train": ("xdl.cli.train:command", "Train a model on a dataset and save it as a run directory."),
    "import": ("xdl.cli.import_:command", "Make a run from a model xdl did not train (Hugging Face, Keras, torch.export, factory)."),
    "explain": ("xdl.cli.analyze:explain", "Explain a run's predictions (saliency, IG, SHAP, LIME, …)."),
    "attack": ("xdl.cli.analyze:attack", "Attack a run's model (FGSM, PGD, eps sweeps)."),
    "report": ("xdl.cli.analyze:report", "Report on a run's health (bias, overfitting, calibration)."),
    "audit": ("xdl.cli.audit:command", "Run every analyzer on a run and write one HTML audit."),
    "compare": ("xdl.cli.compare:command", "Compare audited runs on the same data, with paired intervals."),
    "plugins": ("xdl.cli.plugins:command", "List the registered analyzers."),
    "info": ("xdl.cli.info:command", "Print a run's configuration, metrics and compute card."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, _, attr = COMMANDS[name][0].partition(":")
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, text) for name, (_, text) in COMMANDS.items()])


# Where each topic is written up; the pages live in the source tree's docs/ folder.
DOCS = """\b
Documentation (docs/ beside README.md):
  training.md  data.md  import.md  audit.md  compare.md  explanations.md  robustness.md
  reports.md  privacy.md  data-quality.md  plugins.md  scale.md  security.md
  python.md  benchmarks.md  architecture.md
"""


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]}, epilog=DOCS)
@click.version_option(package_name="xdl", prog_name="xdl")
def cli() -> None:
    """Explain, attack and audit PyTorch classifiers.

    \b
    xdl train                       train on the embedded digits data
    xdl explain RUN --method ig     saliency | ig | gradcam | shap | lime | …
    xdl attack RUN --eps 0.1        FGSM by default, PGD, eps sweeps
    xdl report RUN --method bias    bias | overfit | calibration
    xdl audit RUN                   everything, one self-contained HTML page
    xdl compare RUN_A RUN_B --out D two runs' audits side by side, with intervals
    """


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; exit 2 with one line on stderr for anything the user can fix."""
    from xdl.errors import XdlError

    try:
        cli.main(args=argv, prog_name="xdl", standalone_mode=False)
    except XdlError as exc:
        _fail(str(exc))
    except click.exceptions.Abort:
        _fail("aborted")
    except click.ClickException as exc:
        command = exc.ctx.command_path if getattr(exc, "ctx", None) else "xdl"
        _fail(f"{command}: {exc.format_message()}")
    except KeyboardInterrupt:
        print("xdl: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(0)


def _fail(message: str) -> None:
    line = " ".join(message.split())  # one line, whatever the message held
    print(f"xdl: error: {line}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
