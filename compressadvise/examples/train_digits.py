"""Train and export the bundled digits CNN (deterministic). Needs scikit-learn.

    python -m compressadvise.examples.train_digits

Writes data/digits_cnn.safetensors, data/digits_eval.npz (held-out 20%, raw 0..16 pixel
values as uint8), data/digits_train.npz (the 80% trained on, for `apply --train bundled`)
and data/digits_card.json (float accuracy and how it was measured).
"""
from __future__ import annotations

import json

import numpy as np
import torch
from safetensors.torch import save_file
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from compressadvise.examples.digits import CARD, SAMPLES, TRAIN, WEIGHTS, build_model

SEED = 0


def main() -> None:
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=SEED, stratify=y)
    xt = torch.tensor(x_tr, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    yt = torch.tensor(y_tr)
    model = build_model()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(SEED)
    for epoch in range(40):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), 64):
            idx = perm[i : i + 64]
            loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    xe = torch.tensor(x_te, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    with torch.no_grad():
        acc = float((model(xe).argmax(1) == torch.tensor(y_te)).float().mean())
    WEIGHTS.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(WEIGHTS))
    np.savez_compressed(SAMPLES, inputs=x_te.reshape(-1, 1, 8, 8).astype(np.uint8),
                        labels=y_te.astype(np.uint8))
    np.savez_compressed(TRAIN, inputs=x_tr.reshape(-1, 1, 8, 8).astype(np.uint8), labels=y_tr.astype(np.uint8))
    CARD.write_text(json.dumps({
        "name": "digits-cnn", "dataset": "scikit-learn load_digits (8x8, 10 classes)",
        "split": "stratified 80/20, random_state=0; eval = the 20% held out",
        "train_samples": len(x_tr), "eval_samples": len(x_te), "epochs": 40, "seed": SEED,
        "float_top1": round(acc, 4), "params": sum(p.numel() for p in model.parameters()),
    }, indent=2) + "\n")
    print(f"float top-1 on {len(x_te)} held-out digits: {acc:.4f}")


if __name__ == "__main__":
    main()
