"""Side-by-side reference for bench-index: the same ONNX files through onnxruntime's Python API with the
same intra-op threads, spinning setting, batch and inputs, timing only `session.run` (median of N runs
after one warm-up run). The Rust side is `bench-index --ort-child SPEC.json`.

usage: ort_index.py SPEC.json   (written by bench-index; prints one JSON object)
"""
import json
import sys
import time

import numpy as np
import onnxruntime as ort


def session(path, threads, spinning):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def median_ms(fn, runs):
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    return float(np.median(times))


def main():
    spec = json.load(open(sys.argv[1]))
    threads, spin, runs = spec["threads"], spec["spinning"], spec["runs"]
    out = {"onnxruntime": ort.__version__}
    enc = session(spec["encoder"], threads, spin)
    mel = np.fromfile(spec["mel_file"], "<f4").reshape(1, 80, 3000)
    for b in spec["encoder_batches"]:
        feats = np.repeat(mel, b, axis=0)
        out[f"encoder_b{b}_ms"] = median_ms(lambda: enc.run(["last_hidden_state"], {"input_features": feats}), runs)
    emb = session(spec["embed"], threads, spin)
    names = [i.name for i in emb.get_inputs()]
    ids = np.array(spec["embed_ids"], np.int64)
    for b in spec["embed_batches"]:
        x = np.repeat(ids[None, :], b, axis=0)
        feed = {"input_ids": x, "attention_mask": np.ones_like(x), "token_type_ids": np.zeros_like(x)}
        feed = {k: v for k, v in feed.items() if k in names}
        out[f"embed_b{b}_ms"] = median_ms(lambda: emb.run(None, feed), runs)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
