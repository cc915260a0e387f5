"""bf16 against float32 gradient passes: matrix-product speed at the model's shapes, and how far
bf16-pass gradients (and int4/g64 rounding of float32 ones) are from float32 gradients.

Speed: one [T, in] x [in, out] product per shape (T = 164, the demo's mean document length), 20
repetitions each, float32 then bf16, twice (the second pass is reported). Error: the first
``--docs`` demo documents' gradients under the learner, relative L2 distance over all tensors
from the float32 gradient, for bf16 autocast passes and for int4/g64 encode + decode.

    python benchmarks/bf16_passes.py --threads 1
"""

from __future__ import annotations

import sys
import time

from _common import checkpoint_info, corpus_texts, emit, load_engine, log, parser, print_table, setup


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=4)
    args = p.parse_args()
    setup(args)
    import torch

    from bank_format import CodecSpec, TensorSpec, decode_blob, encode_blob
    from regrad_cli.learner.gradients import document_gradients, fast_bf16

    speed = []
    for m, k, n in [(164, 576, 1536), (164, 1536, 576), (164, 576, 49152)]:
        a, b = torch.randn(m, k), torch.randn(k, n)
        ab, bb = a.bfloat16(), b.bfloat16()
        for _ in range(2):
            t = time.perf_counter()
            for _ in range(20):
                a @ b
            t32 = (time.perf_counter() - t) / 20
            t = time.perf_counter()
            for _ in range(20):
                ab @ bb
            t16 = (time.perf_counter() - t) / 20
        speed.append({"shape": [m, k, n], "fp32_ms": 1e3 * t32, "bf16_ms": 1e3 * t16, "ratio": t32 / t16})

    engine = load_engine()
    model, tok, learner = engine.model, engine.tokenizer, engine.learner
    texts = [t for _, t in corpus_texts()][: args.docs]
    log(f"gradients of {len(texts)} demo documents, float32 and bf16 passes")
    g32 = [document_gradients(model, learner, tok, [x])[0][0] for x in texts]
    g16 = [document_gradients(model, learner, tok, [x], compute_dtype="bfloat16")[0][0] for x in texts]
    names = learner.names
    layout = [TensorSpec(n, tuple(g32[0][n].shape)) for n in names]
    spec = CodecSpec("int4", zstd_level=3, group_size=64)

    def rel(x: dict, y: dict) -> float:
        num = sum(float((x[n] - y[n]).double().pow(2).sum()) for n in names)
        return (num / sum(float(x[n].double().pow(2).sum()) for n in names)) ** 0.5

    errors = []
    for x, y in zip(g32, g16):
        dec = decode_blob(encode_blob([x[n].numpy() for n in names], layout, spec), layout)
        errors.append({"bf16_passes": rel(x, y), "int4_g64": rel(x, {n: torch.from_numpy(a) for n, a in zip(names, dec)})})
    print_table("bf16 / float32 matrix products", ["shape", "fp32 ms", "bf16 ms", "fp32 / bf16"],
                [[str(s["shape"]), s["fp32_ms"], s["bf16_ms"], s["ratio"]] for s in speed])
    print_table("relative L2 distance from the float32 gradient", ["document", "bf16 passes", "int4/g64"],
                [[i, e["bf16_passes"], e["int4_g64"]] for i, e in enumerate(errors)])
    emit({"benchmark": "bf16_passes", "fast_bf16": fast_bf16("cpu"), "matmul": speed, "errors": errors,
          "mean_rel_l2_bf16": sum(e["bf16_passes"] for e in errors) / len(errors),
          "mean_rel_l2_int4_g64": sum(e["int4_g64"] for e in errors) / len(errors),
          "learner": checkpoint_info(engine)}, args.out, args)


if __name__ == "__main__":
    sys.exit(main())
