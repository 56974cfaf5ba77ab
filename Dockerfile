# StyleMix web app.  Build: docker build -t stylemix .
# Run:   docker run --gpus all -p 7860:7860 -v stylemix-hf:/home/app/.cache/huggingface \
#          -v stylemix-data:/home/app/stylemix stylemix
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    GRADIO_SERVER_NAME=0.0.0.0 \
    GRADIO_SERVER_PORT=7860 \
    GRADIO_ANALYTICS_ENABLED=False \
    HF_HOME=/home/app/.cache/huggingface \
    STYLEMIX_HOME=/home/app/stylemix

RUN apt-get update && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 app

WORKDIR /opt/stylemix
COPY requirements.txt pyproject.toml README.md ./
RUN pip install -r requirements.txt
COPY stylemix ./stylemix
COPY trainers ./trainers
COPY ui ./ui
COPY assets ./assets
COPY app.py ./
RUN pip install --no-deps . && mkdir -p /home/app/stylemix /home/app/.cache/huggingface \
    && chown -R app:app /home/app

USER app
WORKDIR /home/app/stylemix
# The model cache and the LoRA library / datasets / jobs live on volumes, not in the image.
VOLUME ["/home/app/.cache/huggingface", "/home/app/stylemix"]
EXPOSE 7860
CMD ["python", "/opt/stylemix/app.py"]
