"""How tests/data/format2 was written, by dynconv at a333de4 (checkpoint format 2: one nn.Linear per router head).

Run from the repository root with that version: ODConv (n=4) and DCD conversions of test_convert_api.TinyNet,
every router parameter moved off zero (as after fine-tuning), and their outputs on a fixed input. Kept as
written: tests/test_checkpoint_format.py loads them with the current code.
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, "tests")
from test_convert_api import TinyNet

import convert

out = Path("tests/data/format2")
torch.manual_seed(0)
base = TinyNet().eval()
x = torch.randn(2, 3, 16, 16)
expected = {}
for kind, options in (("odconv", {"experts": 4}), ("dcd", {})):
    result = convert.convert_model(base, kind=kind, input_size=16, **options)
    with torch.no_grad():  # as after fine-tuning: every router head away from zero
        for name, p in result.model.named_parameters():
            if ".router." in name:
                p.add_(0.3 * torch.randn_like(p))
    print(kind, [n for n, _ in result.model.named_parameters() if ".router." in n])
    convert.save_checkpoint(result, out / f"{kind}.safetensors", overwrite=True)
    expected[kind] = result.model.eval()(x).detach()
save_file({"input": x, **expected}, str(out / "expected.safetensors"))
