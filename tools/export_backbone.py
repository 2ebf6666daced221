"""Export the pre-trained backbone of an ssl-vision checkpoint as a plain timm state dict.

    python tools/export_backbone.py outputs/run/checkpoints/last.ckpt --out simclr_r18.safetensors

writes ``simclr_r18.safetensors`` and the ``simclr_r18.json`` sidecar; see ``ssl_vision/export.py``
for how plain timm loads them. The logic lives in ``ssl_vision.export``.
"""

from __future__ import annotations

import argparse
import json
import sys

from ssl_vision.config import ConfigError
from ssl_vision.export import export_backbone


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a checkpoint written by ssl-vision-train (e.g. <run>/checkpoints/last.ckpt)")
    p.add_argument("--out", default=None, help="output .safetensors (default: <checkpoint>_backbone.safetensors)")
    p.add_argument("--no-verify", action="store_true", help="skip reloading with plain timm to compare features")
    args = p.parse_args(argv)
    try:
        weights, sidecar = export_backbone(args.checkpoint, args.out, verify=not args.no_verify)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    meta = json.loads(sidecar.read_text())
    print(f"wrote {weights}\nwrote {sidecar}")
    kwargs = ", ".join(f"{k}={v!r}" for k, v in meta["create_model_kwargs"].items())
    if meta["small_stem"]:
        print("load (small-image stem): model = timm.create_model("
              f"{meta['model_name']!r}, pretrained=False, {kwargs}); model.conv1 = nn.Conv2d(3, "
              "model.conv1.out_channels, 3, 1, 1, bias=False); model.maxpool = nn.Identity(); "
              f"model.load_state_dict(safetensors.torch.load_file({str(weights)!r}))")
    else:
        print(f"load: timm.create_model({meta['model_name']!r}, pretrained=True, "
              f"pretrained_cfg_overlay=dict(file={str(weights)!r}), {kwargs})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
