-- docker-compose.yml: one postgres for both servers. POSTGRES_DB creates "prefect"; this adds
-- MLflow's database (runs once, on an empty volume).
CREATE DATABASE mlflow;
