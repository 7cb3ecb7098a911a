"""`lmmrt generate`: its options and inputs (images, video, image markers, numbers, device) are checked
before any model is loaded, each error one line in the CLI's words; the summary says why generation ended."""

import os
import sys

import pytest
from cli_util import assert_one_error_line

import lmmrt
from lmmrt import cli
from lmmrt.cli import main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from lmmrt.demo import save_demo

    return save_demo(tmp_path_factory.mktemp("cli") / "demo")


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


def test_a_clip_checkpoint_is_refused_before_its_weights_are_read(tmp_path, capsys):
    """Its config.json says "family": "clip": the refusal came after a load of every weight (a progress
    bar). The directory here has no weights at all, so only a refusal before the load names CLIP."""
    import json

    from lmmrt.models.clip_config import ClipConfig

    (tmp_path / "config.json").write_text(json.dumps(ClipConfig().to_dict()))
    assert main(["generate", str(tmp_path), "-p", "hi"]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert_one_error_line(err)
    assert f"{tmp_path} is a CLIP checkpoint" in err and "cannot generate text" in err, err


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
