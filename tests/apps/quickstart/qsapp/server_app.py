"""qsapp: a Flower / PyTorch app (the ServerApp), its strategy wrapped for gradleak's audit."""

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from gradleak.integrations.flower import LeakageAudit  # the audit: 1 of 3 lines
from qsapp.task import Net

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Main entry point for the ServerApp."""
    fraction_train: float = context.run_config["fraction-train"]
    num_rounds: int = context.run_config["num-server-rounds"]
    lr: float = context.run_config["learning-rate"]

    global_model = Net()
    arrays = ArrayRecord(global_model.state_dict())

    strategy = FedAvg(fraction_train=fraction_train, fraction_evaluate=0.0)
    strategy = LeakageAudit(  # the audit: 2 and 3 of 3 lines
        strategy, out=context.run_config["captures"], model=global_model, normalize=(0.5, 0.5)
    )

    result = strategy.start(
        grid=grid,
        initial_arrays=arrays,
        train_config=ConfigRecord({"lr": lr}),
        num_rounds=num_rounds,
    )
    print(f"trained {num_rounds} rounds; final arrays: {len(result.arrays)} tensors")
