"""lmmrt: a kernel-optimized inference runtime for Flamingo-style multimodal models.

    import lmmrt
    model = lmmrt.load("idefics-9b-lmmrt", device="cuda", dtype="bfloat16")
    out = lmmrt.generate(model, "<image>What is in this picture?", [image], max_new_tokens=32)
    print(out[0].text)
"""

__version__ = "0.1.0"

from lmmrt.api import Model, generate, load, logits  # noqa: E402
from lmmrt.info import info, info_text  # noqa: E402
from lmmrt.runtime.video import VideoClip, generate_video_stream, load_video, video_prompt  # noqa: E402

__all__ = ["Model", "generate", "info", "info_text", "load", "logits", "__version__",
           "VideoClip", "generate_video_stream", "load_video", "video_prompt"]
