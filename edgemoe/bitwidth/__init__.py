"""Expert-wise bitwidth adaptation (EdgeMoE section 4, generalised to several bitwidths
and to a size budget):

- `apply`    per-expert storage formats applied to a model held in RAM, with the same
             `Format.encode` + `Format.expert` the converter and the runtime use; stored
             expert sizes computed the way the store lays blobs out.
- `profile`  `edgemoe profile`: activation frequency and sensitivity of every expert to
             every candidate format, from one pass over calibration text, with the proxy
             checked against full calibration-loss measurements.
- `plan`     `edgemoe plan`: the multi-bitwidth search for a loss tolerance or a size
             budget, verified with real calibration evaluations; writes a plan for
             `edgemoe convert --plan`.
- `plots`    heatmaps of a profile and bit maps of a plan (matplotlib, optional).
"""
