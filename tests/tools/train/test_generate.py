"""Generation writes valid files of the predicted shapes, through the dispatcher."""

from __future__ import annotations

import json

import numpy as np
import soundfile as sf
import torch
from click.testing import CliRunner
from PIL import Image

from blocklm.model.blocklm import BlockLM
from blocklm.model.config import SampleConfig
from blocklm.model.presets import tiny
from blocklm.tools.cli import main
from blocklm.tools.train.config import build_config
from blocklm.tools.train.generate import GenerateConfig, fit_shape, generate


def test_generate_examples_have_predicted_shapes(tokenizer, tmp_path):
    torch.manual_seed(0)
    model = BlockLM(tiny(tokenizer_path=tokenizer)).eval()
    cfg = GenerateConfig(n=3, max_blocks=3, max_block_steps=24, seed=1,
                         sampling=SampleConfig(temperature=1.0, top_k=20))
    from blocklm.formats import text_block
    examples = generate(model, cfg, [text_block("To be")])
    assert [e["key"] for e in examples] == ["gen0000", "gen0001", "gen0002"]
    for ex in examples:
        assert ex["blocks"][0] == {"mode": "text", "shape": [5], "content": "To be",
                                   "generated": False}
        assert 1 <= len(ex["blocks"]) <= 3
        for b in ex["blocks"][1:]:
            assert b["generated"]
            assert model.steps(b["mode"], tuple(b["shape"])) <= 24
            c = b["content"]
            if b["mode"] == "text":
                assert isinstance(c, str) and len(c) == b["shape"][0]
            else:
                assert list(np.asarray(c).shape) == b["shape"]


def test_fit_shape_keeps_channels():
    torch.manual_seed(0)
    model = BlockLM(tiny(tokenizer_path=None, vocab_size=50))
    s = fit_shape(model, "image", (480, 320, 3), 64)
    assert s[2] == 3 and model.steps("image", s) <= 64
    assert fit_shape(model, "image", (4, 4, 3), 64) == (4, 4, 3)


def test_generate_cli_writes_files(tokenizer, tmp_path):
    from blocklm.tools.train.checkpoint import save_checkpoint
    from blocklm.tools.train.loop import RunSpec

    run = tmp_path / "run"
    run.mkdir()
    spec = RunSpec("tiny", ["unused"], None, [f"model.modes.text.tokenizer_path={tokenizer}"])
    spec.save(run)
    torch.manual_seed(0)
    model = BlockLM(build_config(spec.preset, spec.overrides).model)
    save_checkpoint(run, {"model": model.state_dict()})
    res = CliRunner().invoke(main, ["generate", str(run), "--out", str(tmp_path / "g"), "--n",
                                    "2", "--max-blocks", "3", "--max-block-steps", "16",
                                    "--seed", "3", "--adaptive"])
    assert res.exit_code == 0, res.output
    for folder in sorted((tmp_path / "g").iterdir()):
        listing = json.loads((folder / "example.json").read_text())
        for b in listing["blocks"]:
            f = folder / b["file"]
            if b["mode"] == "text":
                assert len(f.read_text(encoding="utf-8")) == b["shape"][0]
            elif b["mode"] == "image":
                img = np.asarray(Image.open(f))
                assert img.shape[:2] == tuple(b["shape"][:2])
            elif b["mode"] == "audio":
                data, _ = sf.read(f, always_2d=True)
                assert list(data.shape) == b["shape"]
