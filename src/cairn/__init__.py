"""cairn: add new knowledge to an LLM round after round without losing what it already knew.

Each contribution (a fine-tuning round, a merge, a mixture) is a stone on the cairn. See the README
for the command-line interface; the packages below hold one concept each:

- ``cairn.data``     tasks, built-in demo tasks, tokenisation with answer-only loss masks
- ``cairn.train``    the one training loop (Accelerate) and its atomic checkpoints
- ``cairn.methods``  method parts: what is trainable, extra loss terms, round data
- ``cairn.combine``  merging and MoE mixing of already-trained models/adapters
- ``cairn.eval``     task metrics, generation, old-knowledge suite, continual-learning figures
- ``cairn.report``   tables, plots and the HTML report
"""

__version__ = "0.1.0"
