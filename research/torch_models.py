"""PyTorch twins of the benchmark families (research.bench), for side-by-side speed.

Same shapes, initial-scale conventions aside, as research.models' `mlp`, `cnn`
(Keras MNIST CNN with its dropouts) and `transformer_lm` (pre-LayerNorm without
biases, learned positions, tanh-GELU MLP, tied embeddings, causal attention
through torch's fused scaled_dot_product_attention); Adam/AdamW with the same
hyper-parameters, cross-entropy on the same real batches. torch is optional
(`pip install -e '.[bench]'`): nothing here imports it until used.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import time


def available() -> bool:
  return importlib.util.find_spec("torch") is not None


def versions() -> dict[str, str]:
  try:
    return {"torch": importlib.metadata.version("torch")}
  except importlib.metadata.PackageNotFoundError:
    return {}


def build(family: str, config, vocab_size: int = 0):
  import torch
  from torch import nn

  model = dict(config.model)
  if family.startswith("mlp"):
    layers, width_in = [nn.Flatten()], 28 * 28
    for width in model["widths"]:
      layers += [nn.Linear(width_in, width), nn.ReLU()]
      width_in = width
    return nn.Sequential(*layers, nn.Linear(width_in, 10))
  if family in ("cnn", "cnn_augment"):
    c1, c2 = model.get("conv_features", (32, 64))
    dense = model.get("dense_features", 128)
    return nn.Sequential(
      nn.Conv2d(1, c1, 3), nn.ReLU(), nn.Conv2d(c1, c2, 3), nn.ReLU(), nn.MaxPool2d(2),
      nn.Dropout(0.25), nn.Flatten(), nn.Linear(c2 * 12 * 12, dense), nn.ReLU(),
      nn.Dropout(0.5), nn.Linear(dense, 10),
    )  # fmt: skip
  if family == "lm":
    return TransformerLM(
      vocab_size, model["num_layers"], model["num_heads"], model["embed_dim"],
      model.get("mlp_ratio", 4), config.data.seq_len,
    )  # fmt: skip
  del torch
  raise ValueError(f"unknown family {family!r}")


def TransformerLM(vocab, num_layers, num_heads, width, mlp_ratio, max_len):  # noqa: N802
  import torch
  from torch import nn
  from torch.nn import functional as F

  class Block(nn.Module):
    def __init__(self):
      super().__init__()
      self.norm_1 = nn.LayerNorm(width, bias=False)
      self.qkv = nn.Linear(width, 3 * width, bias=False)
      self.out = nn.Linear(width, width, bias=False)
      self.norm_2 = nn.LayerNorm(width, bias=False)
      self.fc_in = nn.Linear(width, mlp_ratio * width, bias=False)
      self.fc_out = nn.Linear(mlp_ratio * width, width, bias=False)

    def forward(self, x):
      b, length, _ = x.shape
      q, k, v = self.qkv(self.norm_1(x)).split(width, dim=2)
      heads = lambda t: t.view(b, length, num_heads, width // num_heads).transpose(1, 2)
      y = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=True)
      x = x + self.out(y.transpose(1, 2).reshape(b, length, width))
      return x + self.fc_out(F.gelu(self.fc_in(self.norm_2(x)), approximate="tanh"))

  class LM(nn.Module):
    def __init__(self):
      super().__init__()
      self.embedding = nn.Embedding(vocab, width)
      self.position = nn.Parameter(torch.zeros(max_len, width))
      self.blocks = nn.ModuleList(Block() for _ in range(num_layers))
      self.norm = nn.LayerNorm(width, bias=False)

    def forward(self, tokens):
      x = self.embedding(tokens) + self.position[: tokens.shape[1]]
      for block in self.blocks:
        x = block(x)
      return self.norm(x) @ self.embedding.weight.T

  return LM()


class Trainer:
  """One family's model, optimizer and batches (host tensors, cycled); `run(n)` times
  n training steps. `compiled=True` wraps the model in torch.compile (its compile
  time is `setup_sec`, after the first steps). `device`: "cpu" or "cuda"; batches
  are moved there once, before timing, as JAX's hand-written loop has them."""

  def __init__(self, family: str, config, batches: list[dict], compiled: bool = False,
               device: str = "cpu"):  # fmt: skip
    import torch

    torch.manual_seed(0)
    vocab = int(max(b["inputs"].max() for b in batches)) + 1 if family == "lm" else 0
    vocab = max(vocab, 65)
    self.model = build(family, config, vocab).to(device)
    kwargs = dict(lr=config.optimizer.learning_rate)
    if config.optimizer.name == "adamw":
      self.optimizer = torch.optim.AdamW(self.model.parameters(), **kwargs)
    else:
      self.optimizer = torch.optim.Adam(self.model.parameters(), **kwargs)
    self.batches = []
    for batch in batches:
      inputs = torch.from_numpy(batch["inputs"])
      if family != "lm":
        inputs = (inputs.float() / 255.0).permute(0, 3, 1, 2).contiguous()
      targets = torch.from_numpy(batch["targets"]).long()
      self.batches.append((inputs.to(device), targets.to(device)))
    self.forward = torch.compile(self.model) if compiled else self.model
    self.count = 0
    t0 = time.perf_counter()
    self.run(1)
    self.setup_sec = time.perf_counter() - t0

  def run(self, steps: int) -> float:
    from torch.nn import functional as F

    t0 = time.perf_counter()
    for _ in range(steps):
      inputs, targets = self.batches[self.count % len(self.batches)]
      self.optimizer.zero_grad(set_to_none=True)
      logits = self.forward(inputs)
      loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
      loss.backward()
      self.optimizer.step()
      self.count += 1
    loss.item()
    return time.perf_counter() - t0
