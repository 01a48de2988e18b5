"""The lookup-table kernel (kernels/lut.py) against the dot-product kernel (ternary_linear) on the 2b4t
shapes, side by side: one worker process per instruction set (TERNPOOL_ISA is fixed per process); in
each, per case and round, the min of a few calls of one kernel then of the other (the order alternating
round by round); per case the min over AB_ROUNDS rounds (default 5). Both kernels get the same packed
weights and quantized activations, and their outputs are checked equal first.
Usage: python tests/tools/lut_ab.py THREADS ISA [ISA ...]   (ratio = dot ms / LUT ms: > 1 means LUT wins)
AB_TOKENS (default "8,32,64,128") picks the token counts."""
import json, os, subprocess, sys, time
import numpy as np

SHAPES = ((6912, 2560), (2560, 6912), (2560, 2560))


def worker():
    from ternpool.kernels import set_threads, pack_ternary, ternary_linear, quantize_rows, dequant_factors
    from ternpool.kernels.lut import lut_linear
    from ternpool.kernels.config import ISA
    set_threads(int(os.environ["AB_THREADS"]))
    cache = {}

    def case(out, k, t):
        if (out, k, t) not in cache:
            r = np.random.default_rng(out * 7 + k + t)
            p = pack_ternary(r.integers(-1, 2, size=(out, k)).astype(np.int8))
            q, qsum, scale = quantize_rows(r.standard_normal((t, k)).astype(np.float32))
            div, mul = dequant_factors(scale, 0.03, False)
            fns = (lambda: lut_linear(p, q, qsum, div, mul), lambda: ternary_linear(p, q, qsum, div, mul))
            assert np.array_equal(fns[0](), fns[1]()), ("LUT and dot-product outputs differ", out, k, t)
            cache[(out, k, t)] = fns
        return cache[(out, k, t)]

    print(json.dumps({"isa": ISA}), flush=True)
    for line in sys.stdin:
        out, k, t, inner, flip = json.loads(line)
        best = [float("inf")] * 2
        for which in ((1, 0) if flip else (0, 1)):
            fn = case(out, k, t)[which]
            for _ in range(inner):
                t0 = time.perf_counter(); fn(); best[which] = min(best[which], time.perf_counter() - t0)
        print(json.dumps(best), flush=True)


if __name__ == "__main__" and os.environ.get("AB_WORKER"):
    worker(); sys.exit()

threads, isas = sys.argv[1], sys.argv[2:]
procs = {}
for isa in isas:
    env = dict(os.environ, AB_WORKER="1", AB_THREADS=threads, TERNPOOL_ISA=isa)
    procs[isa] = subprocess.Popen([sys.executable, __file__], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert json.loads(procs[isa].stdout.readline())["isa"] == isa
tokens = [int(t) for t in os.environ.get("AB_TOKENS", "8,32,64,128").split(",")]
rounds = int(os.environ.get("AB_ROUNDS", 5))
print(f"threads {threads}; min over {rounds} rounds (LUT and dot alternating first) of the min of a few calls; ratio = dot / LUT")
print(f"{'out x in':>13}{'tokens':>7}" + "".join(f"{isa + ' LUT ms':>20}{'dot ms':>9}{'ratio':>7}" for isa in isas))
for out, k in SHAPES:
    for t in tokens:
        best = {isa: [float("inf")] * 2 for isa in isas}
        for r in range(rounds):
            for isa in (isas if r % 2 == 0 else isas[::-1]):
                p = procs[isa]; p.stdin.write(json.dumps([out, k, t, 3, r % 2]) + "\n"); p.stdin.flush()
                best[isa] = [min(a, b) for a, b in zip(best[isa], json.loads(p.stdout.readline()))]
        print(f"{out:>6} x {k:<5}{t:>7}" + "".join(f"{best[i][0] * 1e3:20.3f}{best[i][1] * 1e3:9.3f}{best[i][1] / best[i][0]:7.2f}"
                                              for i in isas), flush=True)
for p in procs.values():
    p.stdin.close(); p.wait()
