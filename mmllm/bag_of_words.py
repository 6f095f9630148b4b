"""Bag of words: TF-IDF of a listing's word n-grams and character n-grams, and L2-penalized logistic
regression trained to convergence over it.

The convex lexical model a catalog team would try first, shared by the fusion recipe's lexical member
(``models.fusion.lexicon``) and the grounding layer's attribute applicability (``applicability``):

* :class:`Vectorizer`: TF-IDF over word uni/bigrams and within-word character 3-5 grams of the title,
  the description (its first ``max_chars``) and the seller table, vocabulary from the rows it is fitted
  on (n-grams in ``min_df`` rows or more, the ``max_features`` most frequent), sublinear term frequency,
  smooth idf, each block L2-normalized;
* :func:`fit_logistic_regression`: multinomial logistic regression, L2-penalized as scikit-learn's ``C``
  (loss = mean cross-entropy + ||W||^2 / (2 C N)), full-batch L-BFGS.
* :func:`fit_linear_svm`: one-vs-rest L2-SVM with the squared hinge (scikit-learn's ``LinearSVC``), the same
  penalty and solver; :func:`fit_temperature` turns its margins into probabilities (softmax(scores / T), T by
  the log-loss of out-of-fold scores).
"""

from __future__ import annotations

import math
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from mmllm.catalog import Listing

_WORD = re.compile(r"\w\w+", re.UNICODE)


@dataclass(frozen=True)
class TfidfConfig:
    """What :meth:`Vectorizer.fit` reads (any object with these fields will do)."""

    max_chars: int = 600  # characters of the description read
    min_df: int = 2  # rows an n-gram must occur in to enter the vocabulary
    max_features: int = 200_000  # largest vocabulary (the most frequent n-grams)


def listing_text(listing: Listing, max_chars: int) -> str:
    table = " ".join(f"{k} {v}" for k, v in (listing.attributes or {}).items())
    return " ".join(p for p in (listing.title or "", (listing.description or "")[:max_chars], table) if p).lower()


def _grams(text: str) -> tuple[list[str], list[str]]:
    words = _WORD.findall(text)
    word_grams = words + [f"{a} {b}" for a, b in zip(words, words[1:])]
    chars = []
    for w, count in Counter(words).items():
        padded = f" {w} "
        for n in (3, 4, 5):
            chars.extend([padded[i:i + n] for i in range(len(padded) - n + 1)] * count)
    return word_grams, chars


@dataclass
class Vectorizer:
    """TF-IDF of word uni/bigrams + character 3-5 grams; each block L2-normalized, concatenated."""

    words: dict[str, int]
    chars: dict[str, int]
    idf: list[float]
    max_chars: int = 600

    @property
    def size(self) -> int:
        return len(self.words) + len(self.chars)

    @classmethod
    def fit(cls, listings: Sequence[Listing], cfg: TfidfConfig, chars: bool = True) -> "Vectorizer":
        """The vocabulary and idf of ``listings``; ``chars=False``: word n-grams only (a smaller model)."""
        word_df: Counter[str] = Counter()
        char_df: Counter[str] = Counter()
        for listing in listings:
            w, c = _grams(listing_text(listing, cfg.max_chars))
            word_df.update(set(w))
            if chars:
                char_df.update(set(c))
        word_df = Counter({g: n for g, n in word_df.items() if n >= cfg.min_df})
        char_df = Counter({g: n for g, n in char_df.items() if n >= cfg.min_df})
        kept = sorted([*(("w", g, n) for g, n in word_df.items()), *(("c", g, n) for g, n in char_df.items())],
                      key=lambda x: (-x[2], x[0], x[1]))[: cfg.max_features]
        words = {g: i for i, (_, g, _) in enumerate(sorted((k for k in kept if k[0] == "w"), key=lambda x: x[1]))}
        chars = {g: len(words) + i for i, (_, g, _) in enumerate(sorted((k for k in kept if k[0] == "c"),
                                                                        key=lambda x: x[1]))}
        n = len(listings)
        idf = [0.0] * (len(words) + len(chars))
        for table, df in ((words, word_df), (chars, char_df)):
            for g, i in table.items():
                idf[i] = math.log((1 + n) / (1 + df[g])) + 1.0
        return cls(words, chars, idf, cfg.max_chars)

    def row(self, listing: Listing) -> tuple[list[int], list[float]]:
        """One listing's (column ids, weights)."""
        text = listing_text(listing, self.max_chars)
        ids: list[int] = []
        weights: list[float] = []
        for grams, table in zip(_grams(text), (self.words, self.chars)):
            counts = Counter(table[g] for g in grams if g in table)
            block = [(i, (1.0 + math.log(k)) * self.idf[i]) for i, k in sorted(counts.items())]
            norm = math.sqrt(sum(v * v for _, v in block)) or 1.0
            ids += [i for i, _ in block]
            weights += [v / norm for _, v in block]
        return ids, weights

    def batch(self, listings: Sequence[Listing], rows: Sequence[tuple[Any, Any]] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded [B, L] column ids and weights (padding: id 0, weight 0); ``rows``: the listings' rows
        (lists or tensors), if known."""
        rows = [self.row(r) for r in listings] if rows is None else rows
        width = max([len(ids) for ids, _ in rows] + [1])
        ids, weights = torch.zeros(len(rows), width, dtype=torch.long), torch.zeros(len(rows), width)
        for i, (a, w) in enumerate(rows):
            if len(a):
                ids[i, : len(a)] = torch.as_tensor(a, dtype=torch.long)
                weights[i, : len(w)] = torch.as_tensor(w, dtype=torch.float32)
        return ids, weights

    def matrix(self, listings: Sequence[Listing]) -> torch.Tensor:
        """[N, V] sparse (COO) TF-IDF matrix of the listings."""
        rows, cols, vals = [], [], []
        for r, listing in enumerate(listings):
            ids, weights = self.row(listing)
            rows += [r] * len(ids)
            cols += ids
            vals += weights
        return torch.sparse_coo_tensor(torch.tensor([rows, cols], dtype=torch.long), torch.tensor(vals),
                                       (len(listings), self.size), check_invariants=False).coalesce()

    def to_dict(self) -> dict[str, Any]:
        return {"words": sorted(self.words, key=self.words.get), "chars": sorted(self.chars, key=self.chars.get),
                "idf": list(self.idf), "max_chars": self.max_chars}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Vectorizer":
        words = {g: i for i, g in enumerate(data["words"])}
        chars = {g: len(words) + i for i, g in enumerate(data["chars"])}
        return cls(words, chars, [float(v) for v in data["idf"]], int(data["max_chars"]))


# The most rows a fit runs in the rows' own span (below): X X^T is N x N float64 (72 MB at 3,000 rows) and
# its eigendecomposition costs ~N^3 (about 3.5 s at 3,000 rows on 2 cores).
ROW_SPACE_ROWS = 3000


def _in_row_space(rows: int, columns: int, classes: int, max_iter: int) -> bool:
    """Whether a fit is cheaper in the rows' span: the eigendecomposition (~N^3) against what it saves, the
    L-BFGS updates over V x C numbers (measured on 2 cores: ~1.1e-10 s x N^3 against ~1.2e-8 s x V x C an
    iteration, so the span wins while N^3 < ~50 x iterations x V x C: a 151-class head over 691 rows and
    30,858 n-grams, not a 4-class one over 2,840 rows and 42,493 n-grams)."""
    return rows < columns and rows <= ROW_SPACE_ROWS and rows ** 3 <= 50 * max_iter * columns * classes


def row_gram(x: torch.Tensor, classes: int, max_iter: int) -> torch.Tensor | None:
    """X X^T [N, N] in float64 of a sparse matrix whose fit over ``classes`` runs in the rows' span
    (:func:`_in_row_space`), else None. A fit on some of the rows reads its rows and columns."""
    if not _in_row_space(x.shape[0], x.shape[1], classes, max_iter):
        return None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        xc = x.coalesce().double().to_sparse_csr()
        return (xc @ x.t().coalesce().double().to_sparse_csr()).to_dense()


def _minimize(x: torch.Tensor, n: int, classes: int, c: float, max_iter: int,
              data_term: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
              gram: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(W [V, C], b [C]) minimizing ``data_term`` of the scores x W + b plus ||W||^2 / (2 C N), by full-batch
    L-BFGS. ``data_term(scores)`` returns (its value, its gradient with respect to the scores).

    With few rows and many n-grams x classes (:func:`_in_row_space`) the fit runs in the span of the rows: every
    gradient X^T d + W / (C N) from W = 0 lies in it, so with Q an orthonormal basis of it (X X^T = U S U^T,
    Q = X^T U S^-1/2) and W = Q Z the problem is the same one over the dense N x r matrix X Q = U S^1/2 and
    Z [r, C], on vectors of r x C numbers instead of V x C (the representer theorem: the same optimum; L-BFGS
    sums and takes inner products of gradients and steps, which Q preserves, but torch's first step size and
    stopping tests read the gradient's l1 and max norms, so the two paths stop at slightly different points;
    4x faster for 691 rows x 30,858 n-grams x 151 classes), in float64; ``gram``: X X^T if known
    (:func:`row_gram`). Otherwise the gradient is written out over CSR copies of X and X^T (sparse autograd
    would be several times slower)."""
    if _in_row_space(n, x.shape[1], classes, max_iter):
        gram = row_gram(x, classes, max_iter) if gram is None else gram
        s, u = torch.linalg.eigh((gram + gram.t()) / 2)
        keep = s > s[-1].clamp_min(1e-300) * 1e-10  # the directions the rows span
        u, s = u[:, keep], s[keep]
        design, back = u * s.sqrt(), u * s.rsqrt()  # X Q; W = X^T back Z
        z, b = _lbfgs(lambda v: design @ v, lambda d: design.t() @ d, design.shape[1], n, classes, c, max_iter,
                      data_term, torch.float64)
        return torch.sparse.mm(x.t().coalesce(), (back @ z).float()), b.float()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        xc, xt = x.to_sparse_csr(), x.t().coalesce().to_sparse_csr()
    return _lbfgs(lambda v: xc @ v, lambda d: xt @ d, x.shape[1], n, classes, c, max_iter, data_term, torch.float32)


def _lbfgs(forward: Callable[[torch.Tensor], torch.Tensor], backward: Callable[[torch.Tensor], torch.Tensor],
           size: int, n: int, classes: int, c: float, max_iter: int,
           data_term: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
           dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """L-BFGS over (W [size, C], b [C]) with scores ``forward(W) + b`` and X^T d as ``backward(d)``."""
    w = torch.zeros(size, classes, dtype=dtype, requires_grad=True)
    b = torch.zeros(classes, dtype=dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=10, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-6, tolerance_change=1e-9)
    penalty = 1.0 / (2.0 * c * n)

    @torch.no_grad()
    def closure() -> torch.Tensor:
        value, residual = data_term(forward(w) + b)
        w.grad = backward(residual) + 2.0 * penalty * w
        b.grad = residual.sum(0)
        return value + penalty * (w * w).sum()

    optimizer.step(closure)
    return w.detach(), b.detach()


def fit_logistic_regression(x: torch.Tensor, y: torch.Tensor, classes: int, c: float, max_iter: int,
                            gram: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression, mean CE + ||W||^2 / (2 C N), full-batch L-BFGS: (W [V, C], b [C]).
    ``gram``: X X^T if known (:func:`row_gram`)."""
    n = y.shape[0]
    rows = torch.arange(n)

    def cross_entropy(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logp = torch.log_softmax(scores, -1)
        residual = logp.exp()  # (softmax - onehot) / N
        residual[rows, y] -= 1.0
        return -logp[rows, y].mean(), residual / n

    return _minimize(x, n, classes, c, max_iter, cross_entropy, gram)


def fit_linear_svm(x: torch.Tensor, y: torch.Tensor, classes: int, c: float, max_iter: int,
                   gram: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One-vs-rest L2-SVM with the squared hinge (scikit-learn's ``LinearSVC`` objective per class, the bias
    not penalized): mean over rows of sum_k max(0, 1 - t_ik s_ik)^2 + ||W||^2 / (2 C N), t = +1 for the row's
    class and -1 for the others, full-batch L-BFGS: (W [V, C], b [C]) whose scores ``x W + b`` rank the
    classes (margins, not probabilities: :func:`fit_temperature` turns them into a softmax). ``gram``: X X^T if
    known."""
    n = y.shape[0]
    sign = -torch.ones(n, classes)
    sign[torch.arange(n), y] = 1.0

    def squared_hinge(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        slack = (1.0 - sign * scores).clamp_min(0.0)  # [N, C]
        return (slack * slack).sum() / n, -2.0 * sign * slack / n

    return _minimize(x, n, classes, c, max_iter, squared_hinge, gram)


def fit_temperature(scores: torch.Tensor, y: torch.Tensor) -> float:
    """The temperature T in [0.01, 100] for which softmax(scores / T) has the lowest mean cross-entropy on
    ``y`` (scores of rows the scorer did not train on: out-of-fold): a log grid of 161 points, then refined
    to a twentieth of a grid step around the best; of equal losses, the T nearest 1 (scores that say nothing,
    all equal, keep T = 1)."""
    def key(t: float) -> tuple[float, float]:
        return round(float(torch.nn.functional.cross_entropy(scores / t, y)), 12), abs(math.log(t))

    grid = [10 ** (-2 + 4 * i / 160) for i in range(161)]
    best = min(grid, key=key)
    fine = [min(max(best * 10 ** (0.025 * (i - 20) / 20), 0.01), 100.0) for i in range(41)]
    return min(fine + [best], key=key)


def select_rows(x: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """Rows ``keep`` of a sparse (COO) matrix, coalesced."""
    return torch.index_select(x, 0, torch.tensor(keep, dtype=torch.long)).coalesce()
