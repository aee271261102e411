"""The compression baselines run and measured: one baseline under our budget (`method`, shared by
`layerwise baselines` and every seed of `layerwise study`) and the whole table of `layerwise baselines`
(`table`). The baselines themselves are the library's registry, `layerwise.baselines`."""
