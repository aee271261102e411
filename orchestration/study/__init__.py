"""The study, `layerwise study`: its configuration (`config`), one seed's resumable stages run as a Ray
task (`seed`, its teacher in `teacher`), the statistics over seeds and users (`results`), the driver that
runs the seeds, times their models and writes the report (`driver`), the publication of a finished study
under results/ (`publish`, `layerwise study report`), and the archive of its finished stages that lets it
resume on another machine (`archive`, `layerwise study archive`)."""
