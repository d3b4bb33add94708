-- What actually ran, so analysts group by the values used rather than the values asked for: the parameters a
-- render stage fixed after experiment overrides and model defaults (null when nothing rendered), and how many
-- requests shared the model call.
ALTER TABLE results ADD COLUMN steps Nullable(UInt16);
ALTER TABLE results ADD COLUMN guidance Nullable(Float64);
ALTER TABLE results ADD COLUMN scheduler Nullable(String);
ALTER TABLE results ADD COLUMN width Nullable(UInt16);
ALTER TABLE results ADD COLUMN height Nullable(UInt16);
ALTER TABLE results ADD COLUMN seed Nullable(Int64);
ALTER TABLE results ADD COLUMN strength Nullable(Float64);
ALTER TABLE results ADD COLUMN batch_size Nullable(UInt16);

-- The raw requests table never had a writer: results carry what an analysis needs of a request.
DROP TABLE IF EXISTS requests_dedup;
DROP TABLE IF EXISTS requests;

-- A view's columns are fixed when it is created: results_dedup (0002) must be made again to show the new columns.
DROP TABLE IF EXISTS results_dedup;
CREATE VIEW IF NOT EXISTS results_dedup AS SELECT * FROM results FINAL;
