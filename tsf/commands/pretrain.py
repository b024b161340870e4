"""``tsf pretrain digits|digits_flow|digits_masked``: the recipe that makes the embedded digits models.

Its options are read before torch and Lightning are imported (``--help`` answers at once); the recipes are in
:mod:`tsf.commands.pretrain_recipes`.
"""

from __future__ import annotations

import json
from pathlib import Path

from tsf.commands import ToolParser


def main(argv=None) -> None:
    p = ToolParser(prog="tsf pretrain", description="The recipe that makes the embedded digits models: Lightning fit "
                                                    "runs on scikit-learn's digits, then the quality the README records.")
    p.add_argument("what", choices=["digits", "digits_flow", "digits_masked"],
                   help="digits: the diffusion model and both classifiers; digits_flow: the flow model; "
                        "digits_masked: the masked (discrete) model")
    p.add_argument("--out", type=Path, default=None,
                   help="directory for the weight files (default: the package's, tsf/models/weights)")
    p.add_argument("--denoiser_steps", "--denoiser-steps", type=int, default=15000)
    p.add_argument("--classifier_steps", "--classifier-steps", type=int, default=3000)
    p.add_argument("--flow_steps", "--flow-steps", type=int, default=15000)
    p.add_argument("--masked_steps", "--masked-steps", type=int, default=15000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from tsf.commands import pretrain_recipes as R
    from tsf.models import digits as D

    out = D.WEIGHTS_DIR if args.out is None else args.out
    if args.what == "digits_masked":
        report = R.pretrain_digits_masked(out, args.masked_steps, args.seed)
    elif args.what == "digits_flow":
        report = R.pretrain_digits_flow(out, args.flow_steps, args.seed)
    else:
        report = R.pretrain_digits(out, args.denoiser_steps, args.classifier_steps, args.seed)
    print(json.dumps(report, indent=2))
