from bon.cli import main

# Guarded: vLLM starts its engine processes with spawn, which imports the main module again.
if __name__ == "__main__":
    main()
