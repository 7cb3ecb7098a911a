"""--cuda-graph / --no-cuda-graph on every command that decodes (generate's: tests/test_cli.py): `lmmrt serve`'s
engine and `lmmrt demo`'s model decode as the option says, so a server can turn graph decode off when capture
misbehaves on its GPU."""

from __future__ import annotations

import pytest

import lmmrt.demo
from lmmrt.cli import build_parser, main
from lmmrt.cli_serve import load_engine


class Called(Exception):
    pass


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from lmmrt.demo import save_demo

    return save_demo(tmp_path_factory.mktemp("cuda_graph") / "demo")


# On the CPU "auto" is the eager step (nothing to capture); --cuda-graph is the fixed-shape step, run eagerly.
@pytest.mark.parametrize("flag, mode, fixed", [(None, "auto", False), ("--cuda-graph", True, True),
                                               ("--no-cuda-graph", False, False)])
def test_serve_engine_decodes_as_the_option_says(ckpt, flag, mode, fixed):
    args = build_parser().parse_args(["serve", str(ckpt), "--device", "cpu", "--backend", "torch",
                                      "--max-memory", "64M", "--max-batch", "2", *([flag] if flag else [])])
    model, engine = load_engine(args)
    assert model.cuda_graph == mode and type(model.cuda_graph) is type(mode)
    assert engine.decoder.fixed is fixed and not engine.decoder.use_graph


@pytest.mark.parametrize("flag, mode", [(None, "auto"), ("--cuda-graph", True), ("--no-cuda-graph", False)])
def test_demo_model_decodes_as_the_option_says(monkeypatch, flag, mode):
    built = []

    def record(**kw):  # the real demo model, then stop before the generation
        built.append(real(**kw))
        raise Called

    real = lmmrt.demo.demo_model
    monkeypatch.setattr(lmmrt.demo, "demo_model", record)
    monkeypatch.setenv("LMMRT_TRACEBACK", "1")  # main re-raises, so the test sees Called
    with pytest.raises(Called):
        main(["demo", "--device", "cpu", "--backend", "torch", *([flag] if flag else [])])
    assert built[0].cuda_graph == mode and type(built[0].cuda_graph) is type(mode)


@pytest.mark.parametrize("command", [["serve", "ckpt"], ["demo"], ["generate", "ckpt", "-p", "x"]])
def test_one_option_definition_for_every_command(command):
    for argv in ([*command, "--cuda-graph"], [*command, "--no-cuda-graph"]):
        assert build_parser().parse_args(argv).cuda_graph is (argv[-1] == "--cuda-graph")
    sub = next(a for a in build_parser()._actions if a.dest == "cmd").choices[command[0]]
    help_of = next(a.help for a in sub._actions if a.dest == "cuda_graph")
    assert "--no-cuda-graph: always the eager step" in help_of
