"""The filter `pipeline.quiet.filtered_stderr` runs as a process: stdin to stdout, line
by line, without TensorFlow's CUDA probing (and, as asked, glog INFO lines and what the
image decoders say about a bad file).

Standard library only, and as little of it as will do: the process starts with every
block it filters (`python -I -S stderr_filter.py` takes about 20 ms; importing `logging`
and `pathlib` as well, as `pipeline.quiet` does, took three times that).
"""

from __future__ import annotations

import re
import signal
import sys

# Said by TensorFlow's CUDA probing when there is no GPU to find, at any log level.
CUDA_PROBING = re.compile(
    rb"cuInit|Could not find cuda drivers|cuda_platform\.cc|cudart_stub\.cc|TF-TRT Warning"
    rb"|Unable to register cu(?:DNN|FFT|BLAS) factory|computation placer already registered"
)
# A C++ log line, e.g. `I0000 00:00:1796161741.272731   19237 port.cc:153] ...`. INFO (I) is
# the level TF_CPP_MIN_LOG_LEVEL >= 1 asks to hide, which these lines escape by coming
# before absl has read it (e.g. "oneDNN custom operations are on").
GLOG_LINE = re.compile(rb"^[IWEF]\d{4} [\d:.]+\s+\d+ [\w.-]+:\d+\] ")
# What libjpeg and libpng print straight to stderr about a file they cannot decode (or
# decode with a complaint): the pipeline names such files itself, in one line
# (`pipeline.datasets.image_folder`, `pipeline.predict`).
IMAGE_DECODERS = re.compile(
    rb"^(?:Premature end of JPEG file|Corrupt JPEG data|Input file read error|Not a JPEG file"
    rb"|Improper call to JPEG library|Bogus (?:marker|DQT|DHT|Huffman)|Unsupported marker|Invalid JPEG"
    rb"|libpng (?:warning|error))"
)
# Printed before the first C++ log line of each library: said only before a C++ line that is kept.
ABSL_PREAMBLE = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"


def dropped(line: bytes, *, drop_info: bool, drop_decoders: bool = False) -> bool:
    """Whether `line` is TensorFlow's CUDA probing (or, with `drop_info`, a glog INFO line;
    with `drop_decoders`, an image decoder's complaint)."""
    return (bool(CUDA_PROBING.search(line)) or (drop_info and line.startswith(b"I") and bool(GLOG_LINE.match(line)))
            or (drop_decoders and bool(IMAGE_DECODERS.match(line))))


def forward(source, sink, *, drop_info: bool, drop_decoders: bool = False) -> None:
    """Copy `source` to `sink` line by line, without the lines `dropped` names; absl's
    preamble only before a C++ log line that is kept. A last line without newline is kept too."""
    held = b""
    try:
        for line in iter(source.readline, b""):
            if line.rstrip(b"\r\n") == ABSL_PREAMBLE:
                held = line
            elif not dropped(line, drop_info=drop_info, drop_decoders=drop_decoders):
                if GLOG_LINE.match(line):
                    line, held = held + line, b""
                sink.write(line)
                sink.flush()
    except Exception:  # a bug here must not cost the process its stderr
        sink.write(held)
        for chunk in iter(lambda: source.read(65536), b""):
            sink.write(chunk)
        sink.flush()


if __name__ == "__main__":
    # Ctrl-C or a scheduler's SIGTERM reaches the whole process group: the filter outlives
    # the block's process to forward its last words, and ends when the pipe closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    forward(sys.stdin.buffer, sys.stdout.buffer, drop_info="--drop-info" in sys.argv[1:],
            drop_decoders="--drop-decoders" in sys.argv[1:])
