"""What PLeaS and Twin-Merging share: building and loading models from checkpoints (`loading`), the inputs they
run them on (`data`, with data-free inputs refined in `synthetic`), and tracing them with torch.fx (`tracing`)."""
