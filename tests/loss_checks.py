"""What the loss tests share: the texts of a small code-search batch, their tokenized columns, and the
loss-and-gradients comparison (tests/test_losses.py, tests/test_losses_by_shape.py)."""

from __future__ import annotations

import torch

ANCHORS = ["how to sort a list", "open a file", "x", "parse json text into a dict", "join paths", "hash bytes"]
POSITIVES = [
    "def sort(items): return sorted(items)",
    "with open(path) as f: return f.read()",
    "y",
    "import json\ndef parse(text):\n    return json.loads(text)",
    "os.path.join(a, b)",
    "hashlib.sha256(data).hexdigest() is a long line with many many tokens in it to make lengths differ",
]
NEGATIVES = [["sorted reversed", "write a file"], ["close file", "z"], ["w", "v"], ["dump json", "yaml load"],
             ["split path", "abs path"], ["md5", "crc32 checksum"]]


def features(st, negatives: int = 0):
    """The batch's columns tokenized: anchors, positives, then `negatives` negative columns."""
    columns = [ANCHORS, POSITIVES] + [[n[i] for n in NEGATIVES] for i in range(negatives)]
    return [st.tokenize(texts) for texts in columns]


def loss_and_grads(st, loss_fn, features, labels=None):
    """One loss and backward from zeroed gradients: (loss, every trainable parameter's gradient)."""
    st.zero_grad(set_to_none=True)
    loss = loss_fn(features, labels)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in st.named_parameters() if p.requires_grad and p.grad is not None}
    return loss.detach(), grads


def assert_same(a, b, tol=1e-5):
    """Two (loss, gradients) results agree: the loss within `tol`, each gradient within `tol` + 1e-4 relative."""
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert torch.allclose(loss_a, loss_b, atol=tol, rtol=0), (loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=tol, rtol=1e-4), name
