import os, sys, time, shutil, subprocess
import multiprocessing as mp

def work(d, k, procs, n, t_half, start):
    data = os.urandom(2200)
    start.wait()
    for i in range(k, n, procs):
        base = os.path.join(d, f"{i:06d}_photo")
        tmp = base + ".mat.part"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, base + ".mat")
        if i == n // 2:
            t_half.value = time.perf_counter()

def case(root, procs, n):
    d = os.path.join(root, f"fs_{procs}_{n}")
    shutil.rmtree(d, ignore_errors=True); os.makedirs(d)
    ctx = mp.get_context("fork")
    start = ctx.Barrier(procs + 1); t_half = ctx.Value("d", 0.0)
    ps = [ctx.Process(target=work, args=(d, k, procs, n, t_half, start)) for k in range(procs)]
    [p.start() for p in ps]
    start.wait(); t0 = time.perf_counter()
    [p.join() for p in ps]
    t = time.perf_counter() - t0
    h = t_half.value - t0
    print(f"{root:10s} procs {procs:2d} n {n:6d}: {n / t:8.0f} files/s (first half {n / 2 / h:8.0f}, second {n / 2 / (t - h):8.0f})", flush=True)
    shutil.rmtree(d, ignore_errors=True)

if __name__ == "__main__":
    print(subprocess.run(["df", "-T", "/tmp", "/dev/shm"], capture_output=True, text=True).stdout)
    for root in sys.argv[1:]:
        for procs, n in [(16, 60000), (32, 60000), (16, 120000), (32, 120000)]:
            case(root, procs, n)
