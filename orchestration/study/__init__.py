"""The study, `layerwise study`: its configuration (`config`), one seed's resumable stages run as a Ray
task (`seed`), the statistics over seeds and users (`results`), the driver that runs the seeds, times their
models and writes the report (`driver`), and the publication of a finished study under results/
(`publish`, `layerwise study report`)."""
