"""GPU check for embedtune eval: streaming exact top-k on 1M docs (memory bound, equality) and the CLI on cuda."""
import json, os, random, subprocess, sys, time
import torch
sys.path.insert(0, "src")
from embedtune.retrieval import streaming_topk

out = os.environ.get("OUT", "/tmp")
dev = "cuda"
print(torch.__version__, torch.cuda.get_device_name(0), flush=True)
g = torch.Generator(device=dev).manual_seed(0)
Q, N, D, CH, K = 2000, 1_000_000, 384, 32768, 100
q = torch.nn.functional.normalize(torch.randn(Q, D, device=dev, generator=g), dim=1)

def chunks():
    for c0 in range(0, N, CH):
        gen = torch.Generator(device=dev).manual_seed(1000 + c0)
        n = min(CH, N - c0)
        yield torch.nn.functional.normalize(torch.randn(n, D, device=dev, generator=gen), dim=1)

torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
base = torch.cuda.memory_allocated()
t = time.time(); s, i = streaming_topk(q, chunks(), K); torch.cuda.synchronize()
print(f"streaming: {time.time()-t:.2f}s peak extra {(torch.cuda.max_memory_allocated()-base)/2**20:.0f} MiB", flush=True)
full = torch.cat(list(chunks()))
fs, fi = (q @ full.T).topk(K, dim=1)
print("corpus embeddings alone:", full.numel() * 4 / 2**20, "MiB")
print("ids equal:", torch.equal(i, fi.cpu()), "max score diff:", (s - fs.cpu()).abs().max().item(), flush=True)
del full, fs, fi

# End-to-end CLI on a synthetic BEIR folder, cuda and cpu.
rng = random.Random(0)
words = [f"w{n}" for n in range(5000)]
root = "/tmp/beir"; os.makedirs(f"{root}/qrels", exist_ok=True)
ND, NQ = 200_000, 500
with open(f"{root}/corpus.jsonl", "w") as f:
    for d in range(ND):
        f.write(json.dumps({"_id": f"d{d}", "title": rng.choice(words), "text": " ".join(rng.choices(words, k=20))}) + "\n")
with open(f"{root}/queries.jsonl", "w") as f:
    for qq in range(NQ):
        f.write(json.dumps({"_id": f"q{qq}", "text": " ".join(rng.choices(words, k=6))}) + "\n")
with open(f"{root}/qrels/test.tsv", "w") as f:
    f.write("query-id\tcorpus-id\tscore\n")
    for qq in range(NQ):
        for d in rng.sample(range(ND), 3):
            f.write(f"q{qq}\td{d}\t{rng.choice([1, 2])}\n")
env = dict(os.environ, PYTHONPATH="src", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
for device in ("cuda", "cpu"):
    t = time.time()
    r = subprocess.run([sys.executable, "-m", "embedtune.cli", "eval", ".gpucheck_eval/bert", root, "--device", device,
                        "--compare", ".gpucheck_eval/bert", "--output-json", f"{out}/m_{device}.json", "--batch-size", "256"],
                       env=env, capture_output=True, text=True)
    print(device, "rc", r.returncode, f"{time.time()-t:.1f}s")
    print(r.stdout[-3000:]); print(r.stderr[-1500:], flush=True)
