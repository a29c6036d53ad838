"""effcompile: a JIT compiler and pass framework for efficient transformer inference."""
