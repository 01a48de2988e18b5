"""The kernels of the 2b4t shapes (2-bit and 1.6-bit linears, int8 head) under two or more instruction
sets, side by side: one worker process per ISA (TERNPOOL_ISA is fixed per process), the parent
alternates them case by case; per case the min over AB_ROUNDS rounds (default 5) of the min of a
few calls. On a shared machine this is steadier than whole `ternpool bench kernels` runs one after
the other. Usage: python tests/tools/isa_ab.py THREADS ISA_A ISA_B [...]  (ratios: ISA_A / other);
AB_KINDS (default "2bit,1.6bit,head") and AB_BATCHES (default "1,8,32,64") pick the cases, e.g.
AB_KINDS=2bit AB_BATCHES=8,16,32,64,128 ... avx512vnni amx for the AMX tile threshold (AB_TILE_TOKENS
overrides the amx strategy's tile_tokens in the workers, e.g. 1 to time the tile kernel at every batch).
AB_CLOCK=thread
times with the calling thread's CPU time (time.thread_time) instead of the wall clock: with 1 thread
(the kernels then run in the calling thread) it leaves out the time other processes hold the core."""
import os, sys, time, subprocess, json
import numpy as np

def worker():
    from ternpool.kernels import set_threads, pack_ternary, pack_base3, ternary_linear, base3_linear, quantize_rows, dequant_factors
    from ternpool.kernels.head8 import head_i8
    from ternpool.kernels.config import ISA
    set_threads(int(os.environ["AB_THREADS"]))
    if os.environ.get("AB_TILE_TOKENS") and ISA == "amx":
        import ternpool.kernels.ternary as ternary
        ternary.TILE_TOKENS = int(os.environ["AB_TILE_TOKENS"])
    cache = {}
    def case(kind, out, k, t):
        key = (kind, out, k, t)
        if key not in cache:
            r = np.random.default_rng(out * 7 + k + t)
            if kind == "head":
                w = r.integers(-127, 128, size=(out, k)).astype(np.int8); s = r.uniform(0.5, 2, out).astype(np.float32)
                h = r.standard_normal((t, k)).astype(np.float32)
                cache[key] = lambda: head_i8(w, s, h)
            else:
                w = r.integers(-1, 2, size=(out, k)).astype(np.int8)
                x = r.standard_normal((t, k)).astype(np.float32)
                q, qsum, scale = quantize_rows(x); div, mul = dequant_factors(scale, 1.0, False)
                p, fn = (pack_ternary(w), ternary_linear) if kind == "2bit" else (pack_base3(w), base3_linear)
                cache[key] = lambda: fn(p, q, qsum, div, mul)
            cache[key]()
        return cache[key]
    print(json.dumps({"isa": ISA}), flush=True)
    for line in sys.stdin:
        kind, out, k, t, inner = json.loads(line)
        fn = case(kind, out, k, t)
        best = float("inf")
        clock = time.thread_time if os.environ.get("AB_CLOCK") == "thread" else time.perf_counter
        for _ in range(inner):
            t0 = clock(); fn(); best = min(best, clock() - t0)
        print(json.dumps(best), flush=True)

if __name__ == "__main__" and os.environ.get("AB_WORKER"):
    worker(); sys.exit()

threads, isas = sys.argv[1], sys.argv[2:]
procs = {}
for isa in isas:
    env = dict(os.environ, AB_WORKER="1", AB_THREADS=threads, TERNPOOL_ISA=isa)
    procs[isa] = subprocess.Popen([sys.executable, __file__], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert json.loads(procs[isa].stdout.readline())["isa"] == isa
kinds = os.environ.get("AB_KINDS", "2bit,1.6bit,head").split(",")
batches = [int(t) for t in os.environ.get("AB_BATCHES", "1,8,32,64").split(",")]
cases = []
for kind in ("2bit", "1.6bit"):
    for out, k in ((6912, 2560), (2560, 6912), (2560, 2560)):
        cases += [(kind, out, k, t) for t in batches if kind in kinds]
cases += [("head", 128256, 2560, t) for t in batches if "head" in kinds]
rounds = int(os.environ.get("AB_ROUNDS", 5))
print(f"threads {threads}; min over {rounds} alternating rounds of the min of a few calls; ratio = {isas[0]} / other")
print(f"{'kernel':<7}{'out x in':>14}{'batch':>6}" + "".join(f"{i + ' ms':>16}" for i in isas) + "".join(f"{'x ' + i:>16}" for i in isas[1:]))
for c in cases:
    inner = 3 if c[0] == "head" and c[3] >= 32 else 10
    best = {i: float("inf") for i in isas}
    for r in range(rounds):
        for isa in (isas if r % 2 == 0 else isas[::-1]):
            p = procs[isa]; p.stdin.write(json.dumps([*c, inner]) + "\n"); p.stdin.flush()
            best[isa] = min(best[isa], json.loads(p.stdout.readline()))
    print(f"{c[0]:<7}{c[1]:>8} x {c[2]:<5}{c[3]:>6}" + "".join(f"{best[i] * 1e3:16.3f}" for i in isas)
          + "".join(f"{best[isas[0]] / best[i]:16.2f}" for i in isas[1:]), flush=True)
for p in procs.values():
    p.stdin.close(); p.wait()
