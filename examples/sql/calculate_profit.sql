-- Profit per region for one month (the batch id, e.g. '2024-03').
-- BigQuery SQL: the local warehouse runs the same text, transpiled to DuckDB.
WITH revenue AS (
  SELECT region, SUM(amount) AS revenue
  FROM sales
  WHERE batch_id = @batch_id
  GROUP BY region
),
cost AS (
  SELECT region, SUM(amount) AS expenses
  FROM expenses
  WHERE batch_id = @batch_id
  GROUP BY region
)
SELECT
  CAST(CONCAT(@batch_id, '-01') AS DATE) AS month,
  COALESCE(r.region, c.region) AS region,
  COALESCE(r.revenue, 0) AS revenue,
  COALESCE(c.expenses, 0) AS expenses,
  COALESCE(r.revenue, 0) - COALESCE(c.expenses, 0) AS profit
FROM revenue AS r
FULL OUTER JOIN cost AS c ON r.region = c.region
