import time, torch, sys
torch.set_num_threads(2)
from pathlib import Path
import sentencepiece as spm
import torch.nn.functional as F
from train_default_model import *
sp=spm.SentencePieceProcessor(model_file='/work/corpus/tokenizer.model')
s=Sampler(Path('/work/corpus'), sp, 0, 0.45)
cfg=official_config(8000); model=TinyChatGLM2(cfg)
opt=torch.optim.AdamW(model.parameters(), lr=1e-3)
for use_mask in (True, False):
  for i in range(6):
    t0=time.time()
    ids,t,m=s.batch(8)
    t1=time.time()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits=model(ids, m if use_mask else None)
    loss=F.cross_entropy(logits.float().view(-1,8064), t.view(-1))
    opt.zero_grad(); loss.backward(); opt.step()
    print(use_mask, i, f"data {t1-t0:.3f} step {time.time()-t1:.3f}", flush=True)
