"""Serve a trained checkpoint over HTTP with a web page: python serve.py ckpt=PATH; python serve.py --help."""

import sys

import hydra
from omegaconf import DictConfig

import chestxray  # noqa: F401 - registers the config resolvers


@hydra.main(version_base="1.3", config_path="conf", config_name="serve")
def main(cfg: DictConfig) -> None:
    from chestxray.runtime.console import say
    from chestxray.runtime.entry import run_entry_point
    from chestxray.serving.server import serve

    summary = run_entry_point("serve.py", lambda: serve(cfg), cfg.paths.output_dir, stopped="the server stopped")
    if summary:
        say(f"serve.py: stopped serving http://{summary['host']}:{summary['port']}/")


def refuse_token_argument() -> None:
    """token= never reaches Hydra, which would write it into the run's .hydra files (and argv shows it in `ps`)."""
    from chestxray.serving.token import TOKEN_ON_COMMAND_LINE, token_argument

    if token_argument(sys.argv[1:]):
        print(f"serve.py: error: ConfigError: {TOKEN_ON_COMMAND_LINE}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    refuse_token_argument()
    main()
