-- What actually ran, so analysts group by the values used rather than the values asked for: the parameters a
-- render stage fixed after experiment overrides and model defaults (null when nothing rendered), and how many
-- requests shared the model call.
-- One ALTER, so the columns arrive together: 18.16 has no ADD COLUMN IF NOT EXISTS to make a retry harmless.
ALTER TABLE results
    ADD COLUMN steps Nullable(UInt16),
    ADD COLUMN guidance Nullable(Float64),
    ADD COLUMN scheduler Nullable(String),
    ADD COLUMN width Nullable(UInt16),
    ADD COLUMN height Nullable(UInt16),
    ADD COLUMN seed Nullable(Int64),
    ADD COLUMN strength Nullable(Float64),
    ADD COLUMN batch_size Nullable(UInt16);

-- A view keeps the columns its SELECT * had when it was made (18.16), so the deduplicated view is made again.
DROP TABLE IF EXISTS results_dedup;
CREATE VIEW IF NOT EXISTS results_dedup AS SELECT * FROM results FINAL;

-- The raw requests table never had a writer: results carry what an analysis needs of a request.
DROP TABLE IF EXISTS requests_dedup;
DROP TABLE IF EXISTS requests;
