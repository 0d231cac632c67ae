"""What only makes BLIP fast or small on the machines it runs on: packed oneDNN linears (linear.py), the
bf16 attention backward on the CPU (attention.py), memory settings (memory.py), and what training
recomputes in backward (recompute.py). The model files call each through one function and read the same
without it; each file says what it buys, on which CPU, and the command that measures it."""
