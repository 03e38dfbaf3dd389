"""Resident memory of a loaded model per weight format: each format in its own fresh process, RSS (VmRSS) before
loading (torch and m2r2 imported), after ``m2r2.load(weights=...)``, after a 32-token generation, and the peak
(VmHWM). Writes benchmarks/results/rss.json.

    python scripts/probe_rss.py
"""

import json
import subprocess
import sys

WORKER = """
import json, sys
import torch, m2r2
def kb(field):
    for line in open('/proc/self/status'):
        if line.startswith(field):
            return int(line.split()[1])
base = kb('VmRSS:')
if sys.argv[1] == "imports":  # what every format pays: transformers' import, the config and the tokenizer
    from transformers import AutoConfig
    from m2r2.engine.loading import _load_tokenizer, resolve
    src = resolve(None)
    AutoConfig.from_pretrained(str(src.config_dir)), _load_tokenizer(src.config_dir)
    print(json.dumps({'before_load_mb': base / 1024, 'after_load_mb': kb('VmRSS:') / 1024, 'peak_mb': kb('VmHWM:') / 1024,
                      'model_mb': (kb('VmRSS:') - base) / 1024}))
    sys.exit()
lm = m2r2.load(weights=sys.argv[1])
loaded = kb('VmRSS:')
lm.generate(lm.encode('Why is the sky blue?'), max_new_tokens=32)
print(json.dumps({'before_load_mb': base / 1024, 'after_load_mb': loaded / 1024, 'after_generate_mb': kb('VmRSS:') / 1024,
                  'peak_mb': kb('VmHWM:') / 1024, 'model_mb': (kb('VmRSS:') - base) / 1024}))
"""


def main() -> None:
    from m2r2.engine.blocks import read_gguf_tensors
    from m2r2.engine.loading import embedded_gguf_path
    from m2r2.provenance import machine_info, run_end, run_start
    start = run_start()
    path = embedded_gguf_path()
    out = {}
    for fmt in ("imports", "gguf", "fp32", "fp16"):
        r = subprocess.run([sys.executable, "-c", WORKER, fmt], capture_output=True, text=True, check=True)
        out[fmt] = json.loads(r.stdout.strip().splitlines()[-1])
        print(fmt, out[fmt], file=sys.stderr)
    doc = {"benchmark": "rss", "meta": {**machine_info(), "start": start, "end": run_end()},
           "what": "resident memory (MB) of a fresh process loading the embedded model per weight format; model_mb = "
                   "after generating minus before loading; 'imports': transformers, the config and the tokenizer "
                   "only (what every format pays)",
           "gguf_file_bytes": path.stat().st_size,
           "gguf_tensor_bytes": sum(t.raw.nbytes for t in read_gguf_tensors(path).values()), "rss": out}
    with open("benchmarks/results/rss.json", "w") as f:
        json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
