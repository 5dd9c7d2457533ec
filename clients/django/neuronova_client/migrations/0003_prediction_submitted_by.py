# Written to match `manage.py makemigrations neuronova_client` for the field added to models.py.
# ruff: noqa: RUF012

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('neuronova_client', '0002_review_feedback'),
    ]

    operations = [
        migrations.AddField(
            model_name='prediction',
            name='submitted_by',
            field=models.CharField(blank=True, help_text='the token subject that submitted the task: the service shows a task to its submitter only, so the poller asks as this subject', max_length=150),
        ),
    ]
