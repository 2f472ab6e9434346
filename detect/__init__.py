"""Face detection for process_images and run_pipeline: the detector interface, its backends and
the folder engine. Importing the package (or any of its modules) loads no detector library.

Modules:
    base         Detection (box (4,), score, lm5 (5, 2), lm68), the FaceDetector base class, input checks
    registry     DETECTORS by name, create_detector, resolve_detector_device (--detector/--device)
    mtcnn_tf     the mtcnn package backend (TensorFlow, CPU): the reference
    dlib68       dlib's detector + 68-point predictor; the landmarker behind --landmarks68
    torch_mtcnn  the PyTorch MTCNN backend (batched, CPU or CUDA) over mtcnn_port
    mtcnn_port/  the PyTorch port: networks, weights, pyramid (resize, crops, canvases), nms, detector
    settings     PrepareOptions (what a run does) and Plan (the photos it has to do)
    analyze      one photo: load, detect, choose faces, its report row
    outputs      one photo's files: detections/, landmarks/, debug_vis/
    report       process_report.json: rows, summary, atomic writes, reading back for resuming
    workers      worker processes: counts, thread limits, tasks
    folder       the folder engine: plan_folder, run_plan (one process, pool or batched), detect_to_queue
"""
