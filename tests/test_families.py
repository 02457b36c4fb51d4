

@pytest.mark.parametrize("family", ["gemma2", "phi3"])
def test_gguf_export_refuses_families_llama_cpp_deci_cannot_run(family, tmp_path):
    """llama.cpp's deci graph (the one with per-layer widths) runs the LLaMA layout only: Gemma-2's extra norms and
    soft-capping and Phi-3's fused projections are refused with the reason, and no file is left behind."""
    from tiny_models import tiny_tokenizer

    from slimflow.export.gguf import GGUFExportError, write_gguf

    model = tiny_model(family)
    slimflow.prune(model, calibration(), 0.3, schedule="uniform", progress=False)
    with pytest.raises(GGUFExportError, match=f"model_type='{family}'"):
        write_gguf(model, tiny_tokenizer(), tmp_path / "model.gguf")
    assert not list(tmp_path.iterdir())
