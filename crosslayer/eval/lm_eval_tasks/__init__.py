"""Task configs for running lm-eval's standard tasks on local data (`crosslayer eval tasks --data-dir`).

Each `<task>.yaml` here is a template. At run time `crosslayer.eval.tasks` fills in absolute paths
and writes the result to a temporary folder: the config `include:`s lm-eval's own installed task
YAML (prompt, `process_docs`, metrics, version) and overrides only the dataset location and split.
`local_data` turns the files of a data folder into the schema those tasks expect.
"""
