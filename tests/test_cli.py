"""The `lmmrt` command: instant help (no torch import), one-line errors with an exit status and never a
traceback, option checks before any model is loaded, help texts, and the flags wired to the API."""

import os
import shutil
import subprocess
import sys

import pytest

import lmmrt
from lmmrt import cli
from lmmrt.cli import main

ENV = {**os.environ, "LMMRT_TRACEBACK": ""}


def run_lmmrt(*args, code=None):
    """`python -m lmmrt ARGS` (or the Python `code`) in a fresh interpreter: (status, stdout, stderr)."""
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "lmmrt", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=120)
    return r.returncode, r.stdout, r.stderr


def assert_one_error_line(err: str):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmmrt: error: ") and "Traceback" not in err, err


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from lmmrt.demo import save_demo

    return save_demo(tmp_path_factory.mktemp("cli") / "demo")


@pytest.fixture
def broken(ckpt, tmp_path):
    """A copy of the demo checkpoint to damage."""
    dst = tmp_path / "broken"
    shutil.copytree(ckpt, dst)
    return dst


# -- instant help: `import lmmrt` and the parser import no torch ---------------------------------------

NO_TORCH = """
import runpy, sys
sys.argv = ["lmmrt", *{args!r}]
try:
    runpy.run_module("lmmrt", run_name="__main__")
except SystemExit as e:
    print("exit", e.code)
print("torch imported:", "torch" in sys.modules)
"""


@pytest.mark.parametrize("args", [["--help"], ["generate", "--help"], ["convert", "idefics", "--help"],
                                  ["generate", "m", "-p", "x", "--top-p", "2"], ["nosuchcommand"]])
def test_help_and_argument_errors_do_not_import_torch(args):
    status, out, err = run_lmmrt(code=NO_TORCH.format(args=args))
    assert status == 0, err
    assert "torch imported: False" in out, out
    assert ("exit 0" if "--help" in args else "exit 2") in out


def test_lazy_package_exposes_the_api():
    code = """
import sys
import lmmrt
assert "torch" not in sys.modules, "import lmmrt imported torch"
for name in lmmrt.__all__:
    assert name in dir(lmmrt), name
from lmmrt.info import info_text   # the submodule `info` must not shadow the function lmmrt.info
assert callable(lmmrt.info) and lmmrt.info_text is info_text
from lmmrt import generate
import lmmrt.api
assert generate is lmmrt.api.generate and lmmrt.load is lmmrt.api.load and lmmrt.logits is lmmrt.api.logits
assert lmmrt.load_video is lmmrt.runtime.video.load_video
try:
    lmmrt.no_such_name
except AttributeError as e:
    assert "no_such_name" in str(e)
print("ok")
"""
    status, out, err = run_lmmrt(code=code)
    assert status == 0 and out.strip() == "ok", err


# -- errors: one line, an exit status, no traceback ---------------------------------------------------

def test_keyboard_interrupt_exits_130_without_traceback():
    code = """
import os, signal
from lmmrt import cli
cli._cmd_info = lambda args: os.kill(os.getpid(), signal.SIGINT)   # a real Ctrl-C in the middle of a command
raise SystemExit(cli.main(["info"]))
"""
    status, _, err = run_lmmrt(code=code)
    assert status == 130 and "Traceback" not in err and "interrupted" in err, err


def test_closed_output_pipe_exits_141_without_traceback():
    p = subprocess.Popen([sys.executable, "-m", "lmmrt", "info"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=ENV)
    p.stdout.close()  # the reader goes away before lmmrt prints (it imports torch first)
    err = p.stderr.read()
    assert p.wait(timeout=120) == cli.EXIT_BROKEN_PIPE and not err, err


def test_unexpected_error_is_one_line_and_traceback_on_request(monkeypatch, capsys):
    def boom(args):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(cli, "_cmd_info", boom)
    monkeypatch.setenv("LMMRT_TRACEBACK", "")
    assert main(["info"]) == cli.EXIT_UNEXPECTED
    err = capsys.readouterr().err
    assert_one_error_line(err)
    assert "ZeroDivisionError: division by zero" in err and "LMMRT_TRACEBACK=1" in err
    monkeypatch.setenv("LMMRT_TRACEBACK", "1")
    with pytest.raises(ZeroDivisionError):
        main(["info"])


def _garbage_weights(d):
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")


def _json_list_config(d):
    (d / "config.json").write_text("[1, 2]")


def _null_config(d):
    (d / "config.json").write_text("null")


def _invalid_json_config(d):
    (d / "config.json").write_text("{not json")


def _garbage_tokenizer(d):
    (d / "tokenizer.json").write_text("garbage")


def _empty_tokenizer(d):
    (d / "tokenizer.json").write_text("")


def _directory_tokenizer(d):
    (d / "tokenizer.json").unlink()
    (d / "tokenizer.json").mkdir()


@pytest.mark.parametrize("damage, file", [(_garbage_weights, "model.safetensors"), (_json_list_config, "config.json"),
                                          (_null_config, "config.json"), (_invalid_json_config, "config.json"),
                                          (_garbage_tokenizer, "tokenizer.json"), (_empty_tokenizer, "tokenizer.json"),
                                          (_directory_tokenizer, "tokenizer.json")])
def test_damaged_checkpoint_is_one_error_line_naming_the_file(broken, damage, file, capsys, monkeypatch):
    monkeypatch.setenv("LMMRT_TRACEBACK", "")
    damage(broken)
    status = main(["generate", str(broken), "-p", "hi", "--device", "cpu", "--max-new-tokens", "1", "--quiet"])
    err = capsys.readouterr().err
    assert_one_error_line(err)
    assert status == cli.EXIT_ERROR and file in err, err


@pytest.mark.parametrize("make, message", [
    (lambda p: p.mkdir(), "is a directory, not a file"),
    (lambda p: os.symlink(p.name, p), "is a symlink loop"),
    (lambda p: os.symlink("elsewhere", p), "is a broken symlink"),
    (lambda p: None, "image file not found"),
    (lambda p: p.write_text("not an image"), "cannot read image"),
])
def test_bad_image_path_is_named_before_loading(tmp_path, make, message, capsys):
    path = tmp_path / "img.png"
    make(path)
    # the model path does not exist either: the image is checked first, so the message is about it
    assert main(["generate", str(tmp_path / "no-model"), "-p", "<image>x", "-i", str(path)]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert_one_error_line(err)
    assert message in err and str(path) in err, err


def test_video_directory_is_reported_as_a_directory(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "no-model"), "-p", "x", "--video", str(tmp_path)]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert_one_error_line(err)
    assert f"video file {tmp_path} is a directory" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_image(tmp_path, capsys):
    path = tmp_path / "img.png"
    path.write_bytes(b"x")
    path.chmod(0)
    assert main(["generate", str(tmp_path), "-p", "<image>x", "-i", str(path)]) == cli.EXIT_ERROR
    assert "cannot read image file" in capsys.readouterr().err


@pytest.mark.parametrize("option, value, message", [
    ("--fps", "inf", "must be a finite number > 0"), ("--fps", "0", "must be > 0"),
    ("--max-frames", "0", "must be >= 1"), ("--max-new-tokens", "2.5", "expected an integer"),
    ("--max-new-tokens", "-1", "must be >= 0"), ("--top-k", "2.5", "expected an integer"),
    ("--top-p", "0", "must be in (0, 1]"), ("--temperature", "nan", "must be a finite number >= 0"),
    ("--repetition-penalty", "0", "must be > 0"), ("--seed", str(2**70), "must be in [0, 2**63)"),
])
def test_numeric_options_are_checked_by_the_parser(option, value, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "m", "-p", "x", option, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: {message}" in err and "Traceback" not in err, err


def test_device_errors_speak_cli_not_python(tmp_path, capsys):
    assert main(["generate", str(tmp_path), "-p", "x", "--device", "gpu"]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "--device cpu" in err and "device='cpu'" not in err, err
    with pytest.raises(ValueError, match="device='cpu'"):  # the Python API keeps Python's spelling
        lmmrt.load(tmp_path, device="gpu")


def test_parser_choices_agree_with_the_library():
    from lmmrt.api import _DTYPES
    from lmmrt.kernels.backend import BACKENDS

    assert set(cli.DTYPE_NAMES) == set(_DTYPES) and set(cli.BACKEND_NAMES) == set(BACKENDS)


@pytest.mark.parametrize("args", [["generate", "m", "-p", "x", "--dtype", "int8"], ["info", "--backend", "gpu"],
                                  ["convert", "idefics", "a", "b", "--dtype", "float64"]])
def test_dtype_and_backend_are_checked_by_the_parser(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


# -- help texts ----------------------------------------------------------------------------------------

def _subparser(*names):
    p = cli.build_parser()
    for name in names:
        p = next(a for a in p._actions if a.dest in ("cmd", "format")).choices[name]
    return p


def test_every_generate_option_is_described_with_its_default():
    p = _subparser("generate")
    text = p.format_help()
    for action in p._actions:
        if action.dest == "help":
            continue
        assert action.help, f"{action.option_strings or action.dest} has no help"
        if action.default not in (None, False, []):
            assert "default" in cli.HelpFormatter("x")._get_help_string(action), action.option_strings
    for phrase in ("(default: 64)", "0 = greedy", "0 = no limit", "1 = no limit", "1 = off", "--no-cuda-graph"):
        assert phrase in " ".join(text.split()), phrase


def test_convert_help_tells_about_tokenizer_json():
    text = " ".join(_subparser("convert", "idefics").format_help().split())
    assert "tokenizer.json is copied" in text and "token ids only" in text and "--force" in text


# -- flags wired to the API ----------------------------------------------------------------------------

class Called(Exception):
    pass


@pytest.fixture
def reraise(monkeypatch):
    monkeypatch.setenv("LMMRT_TRACEBACK", "1")  # main re-raises, so the test sees the exception


@pytest.mark.parametrize("flag, expected", [(None, "auto"), ("--cuda-graph", True), ("--no-cuda-graph", False)])
def test_cuda_graph_flag(monkeypatch, reraise, tmp_path, flag, expected):
    seen = {}

    def fake_load(path, **kw):
        seen.update(kw)
        raise Called

    monkeypatch.setattr(lmmrt, "load", fake_load)
    with pytest.raises(Called):
        main(["generate", str(tmp_path), "-p", "x", "--device", "cpu", *([flag] if flag else [])])
    assert seen["cuda_graph"] == expected


@pytest.mark.parametrize("fmt, module, function, extra", [
    ("idefics", "lmmrt.convert.idefics", "convert_idefics", ["src"]),
    ("openflamingo", "lmmrt.convert.openflamingo", "convert_openflamingo",
     ["--checkpoint", "c.pt", "--lm", "lm", "--vision", "v"]),
])
@pytest.mark.parametrize("force", [False, True])
def test_convert_force_flag(monkeypatch, reraise, fmt, module, function, extra, force):
    import importlib

    seen = {}

    def fake_convert(*args, **kw):
        seen.update(kw)
        raise Called

    monkeypatch.setattr(importlib.import_module(module), function, fake_convert)
    with pytest.raises(Called):
        main(["convert", fmt, *extra, "out", "--quiet", *(["--force"] if force else [])])
    assert seen["force"] is force


def test_demo_save_refuses_an_existing_dir_unless_force(ckpt, tmp_path, capsys):
    out = tmp_path / "demo"
    shutil.copytree(ckpt, out)
    before = (out / "model.safetensors").stat().st_mtime_ns
    assert main(["demo", "--save", str(out)]) == cli.EXIT_ERROR
    assert_one_error_line(capsys.readouterr().err)
    assert (out / "model.safetensors").stat().st_mtime_ns == before
    assert main(["demo", "--save", str(out), "--force"]) == 0
    assert (out / "model.safetensors").stat().st_mtime_ns != before


# -- what a new user following the README hit ---------------------------------------------------------

def test_parser_error_is_one_line_pointing_at_the_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "m", "-p", "x", "--top-p", "2"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert_one_error_line(err)
    assert "see `lmmrt generate --help`" in err and "usage:" not in err, err


def _no_load(monkeypatch):
    def fail(*a, **kw):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(lmmrt, "load", fail)


@pytest.mark.parametrize("prompt, n_images", [("<image>a<image>b", 1), ("no marker", 1), ("<image>x", 0)])
def test_image_markers_are_counted_against_the_files_before_loading(ckpt, tmp_path, monkeypatch, capsys, prompt,
                                                                    n_images):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    _no_load(monkeypatch)
    assert main(["generate", str(ckpt), "-p", prompt, *["-i", str(tmp_path / "a.png")] * n_images]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert_one_error_line(err)
    assert f"{prompt.count('<image>')} <image> marker(s) but {n_images} image(s)" in err, err
    assert "pass one -i per <image>" in err


def test_markers_of_a_transformers_idefics_directory_are_counted(tmp_path, monkeypatch, capsys):
    (tmp_path / "config.json").write_text('{"model_type": "idefics"}')
    _no_load(monkeypatch)
    assert main(["generate", str(tmp_path), "-p", "<image>x"]) == cli.EXIT_ERROR
    assert "pass one -i per <image>" in capsys.readouterr().err


def test_video_without_pyav_is_reported_before_loading(ckpt, tmp_path, monkeypatch, capsys):
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"\0" * 16)
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` fails as if PyAV were not installed
    _no_load(monkeypatch)
    assert main(["generate", str(ckpt), "-p", "x", "--video", str(video)]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert_one_error_line(err)
    assert "--video needs PyAV" in err and "pip install av" in err and "EXTRAS=video" in err, err


def test_video_mode_errors_speak_cli_not_python(ckpt, tmp_path, monkeypatch, capsys):
    from types import SimpleNamespace

    from lmmrt.cli_generate import video_cli_wording
    from lmmrt.runtime.video import resolve_mode

    video = tmp_path / "clip.mp4"
    video.write_bytes(b"\0" * 16)
    _no_load(monkeypatch)
    # the demo checkpoint has no frame embeddings: refused from config.json, before the load
    assert main(["generate", str(ckpt), "-p", "x", "--video", str(video), "--video-mode", "clip"]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "--video-mode frames" in err and "mode=" not in err, err
    # a clip longer than the frame embeddings is only known after decoding: the library's message, reworded
    model = SimpleNamespace(config=SimpleNamespace(perceiver=SimpleNamespace(max_frames=4)))
    with pytest.raises(ValueError) as e:
        resolve_mode(model, "clip", n_frames=8)
    text = video_cli_wording(str(e.value))
    assert "--video-mode frames" in text and "--max-frames" in text and "=" not in text.split("max_frames=4")[1], text


def test_frames_without_timestamps_error_shows_both_ways():
    import numpy as np

    frames = np.full((3, 8, 8, 3), 7, np.uint8)
    with pytest.raises(ValueError) as e:
        lmmrt.load_video(frames, fps=1, max_frames=8)
    assert "source_fps=" in str(e.value) and "leave fps out" in str(e.value)
    assert len(lmmrt.load_video(frames, fps=1, source_fps=2, max_frames=8)) == 2  # the forms the message gives
    assert len(lmmrt.load_video(frames, max_frames=8)) == 3


def test_demo_save_refuses_before_building_and_names_the_option(ckpt, tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    assert main(["demo", "--save", str(out)]) == cli.EXIT_ERROR
    captured = capsys.readouterr()
    assert "building" not in captured.out, captured.out
    assert "pass --force" in captured.err and "force=True" not in captured.err, captured.err


def test_summary_says_why_generation_ended(ckpt, capsys):
    assert main(["generate", str(ckpt), "-p", "hi", "--max-new-tokens", "2", "--device", "cpu", "--quiet"]) == 0
    assert main(["generate", str(ckpt), "-p", "hi", "--max-new-tokens", "2", "--device", "cpu"]) == 0
    assert "[length: 2 tokens (--max-new-tokens 2); " in capsys.readouterr().err


@pytest.mark.parametrize("token_ids, reason, stop, expected", [
    ([2], "stop", [], "stop: end-of-sequence after 1 token"),
    ([], "stop", ["x"], "stop: a --stop string after 0 tokens"),
    ([5, 6, 7], "length", [], "length: 3 tokens"),
])
def test_finish_note(token_ids, reason, stop, expected):
    from types import SimpleNamespace

    from lmmrt.cli_generate import finish_note
    from lmmrt.runtime.generate import GenerationResult

    model = SimpleNamespace(config=SimpleNamespace(eos_token_id=2, stop_token_ids=[]))
    args = SimpleNamespace(max_new_tokens=3, ignore_eos=False, stop=stop)
    assert finish_note(model, args, GenerationResult("", token_ids, reason)).startswith(expected)
    model.last_stats = SimpleNamespace(new_tokens=len(token_ids))  # --stream: told from the count
    assert finish_note(model, args).startswith(expected.replace("a --stop string", "end-of-sequence or a --stop "
                                                                "string"))


def test_every_command_has_a_description_and_the_families_are_listed():
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if a.dest == "cmd").choices
    for names in [(c,) for c in commands] + [("convert", f) for f in cli.CONVERTERS]:
        assert _subparser(*names).description, names
    described = parser.description.lower().replace("-", "")  # "BLIP-2" -> "blip2"
    for family in cli.CONVERTERS:
        assert family in described, family


def test_build_kernels_without_cupy_says_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "cupy_backends.cuda.libs.nvrtc", None)  # as if CuPy were not installed
    assert main(["build-kernels", "--arch", "90"]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert_one_error_line(err)
    assert "needs CuPy, which is not installed" in err and 'pip install "lmmrt[cupy]"' in err, err


def test_demo_prints_its_header_first_and_streams_the_same_request(capsys):
    assert main(["demo", "--max-new-tokens", "5", "--device", "cpu", "--backend", "torch"]) == 0
    out = capsys.readouterr().out
    assert out.index("RANDOM weights") < out.index("building the demo model") < out.index("built in")
    assert "special tokens that print as nothing" in out
    assert "5 tokens" in out and "the same text as above" in out, out
