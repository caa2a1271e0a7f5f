"""Run on 2 ranks by tests/test_flora_train.py: Flora data parallel without DeepSpeed. Every rank
builds the same model and optimizer, backpropagates its own half of the batch (2 micro-batches,
compressed accumulation), averages with ``all_reduce_gradients_`` and steps; writes the momentum
and accumulation seeds, a digest of each projection they draw, the values sent and the parameters
to <out_dir>/rank<N>.json."""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as tdist

from dsft.optim.flora import Flora, projected_side, projection

out_dir = Path(sys.argv[1])
tdist.init_process_group("gloo")
rank = tdist.get_rank()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.Tanh(), torch.nn.Linear(40, 24))
optimizer = Flora(model.parameters(), lr=0.02, rank=8, kappa=2, seed=5)
optimizer.register_accumulation_hooks()
x = torch.randn(8, 24, generator=torch.Generator().manual_seed(1))
y = torch.randn(8, 24, generator=torch.Generator().manual_seed(2))
sent = []
for _ in range(3):
    for micro in range(2):  # this rank's rows: 4 of the global 8, in 2 micro-batches
        rows = slice(4 * rank + 2 * micro, 4 * rank + 2 * micro + 2)
        # the loss of the global batch is the mean of the ranks' losses: halve per rank
        (torch.nn.functional.mse_loss(model(x[rows]), y[rows], reduction="sum") * 2).backward()
    sent.append(optimizer.all_reduce_gradients_())
    optimizer.step()
    optimizer.zero_grad()
weights = [model[0].weight, model[2].weight]
seed_keys = ("momentum_seed", "accumulation_seed")
report = {
    "seeds": [[optimizer.state[w][key] for key in seed_keys] for w in weights],
    "projection_sums": [[float(projection(optimizer.state[w][key], 8,
                                          w.shape[projected_side(w.shape)], w.device).sum())
                         for key in seed_keys] for w in weights],
    "sent": sent,
    "params": [p.detach().tolist() for p in model.parameters()],
}
(out_dir / f"rank{rank}.json").write_text(json.dumps(report))
tdist.destroy_process_group()
