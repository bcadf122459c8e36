"""Run records: the JSON-lines log, its summary line and its curves."""
from visionmamba.train.records import append_record, plot_records, read_log, summary


def test_append_record_drops_records_from_a_killed_run_and_rewrites_atomically(tmp_path):
    log = tmp_path / "log.jsonl"
    for epoch in range(3):
        append_record(log, {"epoch": epoch, "train_loss": 1.0 / (epoch + 1)}, "epoch")
    records = append_record(log, {"epoch": 1, "train_loss": 0.7}, "epoch")  # resumed from after epoch 0
    assert [r["epoch"] for r in records] == [0, 1] and read_log(log)[-1]["train_loss"] == 0.7
    assert not list(tmp_path.glob(".*.tmp"))


def test_summary_shows_what_the_record_has_in_a_fixed_order():
    epoch = {"epoch": 2, "lr": 1e-3, "train_loss": 0.5, "val_loss": 0.4, "top1": 90.0, "top5": 99.0, "img_per_s": 120.4,
             "peak_mem_mb": 900.2, "skipped_steps": 0, "skipped_images": 3}
    assert summary(epoch, "epoch") == ("epoch 2: lr 1.00e-03, train loss 0.5000, val loss 0.4000, top-1 90.00%, "
                                       "top-5 99.00%, 120 img/s, peak 900 MB, skipped 3 images")
    dense = {"iter": 100, "lr": 2e-4, "train_loss": 1.25, "mIoU": 40.0, "mAcc": 50.0, "aAcc": 80.0, "peak_mem_mb": 10.0,
             "skipped_steps": 2, "val_images": 4}
    assert summary(dense, "iter") == ("iter 100: lr 2.00e-04, train loss 1.2500, mIoU 40.00, mAcc 50.00, aAcc 80.00, "
                                      "peak 10 MB, skipped 2 steps")


def test_plot_records_writes_one_panel_per_group(tmp_path):
    records = [{"epoch": e, "train_loss": 1.0 / (e + 1), "top1": 10.0 * e} for e in range(3)]
    plot_records(records, tmp_path / "curves.png", "epoch", [("loss", ["train_loss", "val_loss"]), ("accuracy", ["top1"])])
    assert (tmp_path / "curves.png").stat().st_size > 5000
