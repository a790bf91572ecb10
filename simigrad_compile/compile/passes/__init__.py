"""FX/Inductor passes that rewrite the joint forward+backward graph (see manager.py)."""
