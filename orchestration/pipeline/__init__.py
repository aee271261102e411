"""The main job, `layerwise run`: its configuration (`config`), resumable stages (`stages`), the stages
themselves (`steps`: data, teacher, importance, compact, heal, evaluate, bench), the headline table
(`headline`), the run (`run`), and Ctrl-C handling that survives a long run (`interrupts`)."""
