"""Shrinking the expert set itself, the Edge-MoE survey's other axis next to bitwidths:
pruning (drop the least important experts of each layer) and merging (fold similar
experts of a layer into one shared set of weights).

Both read a Hugging Face directory and write one in the same family and tensor layout,
so that transformers and every edgemoe command (convert, profile, plan, eval, serve)
accept the result. Nothing here runs at inference time.
"""
